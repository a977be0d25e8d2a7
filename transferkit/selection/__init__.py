"""Choosing what to transfer: transferability scores and unsupervised validation.

Two questions, two families of functions.

**Which pretrained model (or layer) should I transfer from?** Extract each candidate's
features (or source-class probabilities) on the labelled target data and score them;
higher is better for every score. No fine-tuning is needed.

* [`logme`][] -- log maximum evidence of a Bayesian linear model (You et al., 2021).
* [`leep`][] -- log expected empirical prediction of the source classifier
  (Nguyen et al., 2020).
* [`hscore`][] -- H-score (Bao et al., 2019), by default with the Ledoit-Wolf
  regularised covariance of Ibrahim et al. (2022), so that noise does not rank first.
* [`nce`][] -- negative conditional entropy of target labels given source labels
  (Tran et al., 2019).
* [`knn_score`][], [`linear_probe_score`][] -- cross-validated baselines.
* [`rank`][] -- scores several candidates and returns a [`Ranking`][] table.

**Which adapted model (or trade-off weight) is best when the target has no labels?**
Score each adapted model on labelled *source* validation data and unlabelled target
data.

* [`iwcv`][] -- importance-weighted validation risk (Sugiyama et al., 2007); lower
  is better.
* [`dev`][] -- deep embedded validation risk (You et al., 2019); lower is better.
* [`snd`][] -- soft neighbourhood density of target predictions (Saito et al., 2021);
  higher is better.
* [`prediction_entropy`][] -- mean entropy of target predictions; lower is better.
* [`importance_weights`][] -- the density ratio ``p_target(x) / p_source(x)`` from a
  domain classifier, shared by [`iwcv`][] and [`dev`][].

Everything accepts ``numpy`` arrays or ``torch`` tensors and computes in float64 NumPy
(``snd`` in float32 torch), returning plain Python floats.
"""

from __future__ import annotations

from .._public import publish
from ._baselines import knn_score, linear_probe_score
from ._hscore import hscore
from ._importance import dev, importance_weights, iwcv
from ._inputs import ArrayLike as ArrayLike
from ._logme import logme
from ._ranking import SCORES as SCORES
from ._ranking import RankedCandidate, Ranking, rank
from ._ranking import ScoreName as ScoreName
from ._source_predictions import ESTIMATORS as ESTIMATORS
from ._source_predictions import Estimator as Estimator
from ._source_predictions import leep, nce
from ._target_predictions import prediction_entropy, snd

__all__ = [
    "RankedCandidate",
    "Ranking",
    "dev",
    "hscore",
    "importance_weights",
    "iwcv",
    "knn_score",
    "leep",
    "linear_probe_score",
    "logme",
    "nce",
    "prediction_entropy",
    "rank",
    "snd",
]

# Public objects report the package as their module (see transferkit._public).
publish(__name__, globals(), __all__)

"""Evaluation: image metrics (FID, IS, precision/recall), MNIST metrics with the shipped classifier,
and router analysis (foreground retention, compression vs timestep). See ``docs/evaluation.md``.

One concept per module, imported in this order (no module imports one further down):

* :mod:`.metrics` – the metric math, pure functions on features and probabilities;
* :mod:`.images` – samples on disk (folder / ADM .npz), their labels and ``settings.json``;
* :mod:`.extractors` – feature networks from local TorchScript files (Inception);
* :mod:`.reference` – reference statistics (saved with the identity of their network);
* :mod:`.mnist_classifier` – the packaged MNIST classifier and the MNIST metrics;
  :mod:`.mnist_training` trains it;
* :mod:`.evaluate` – the driver: which metrics, the results JSON of ``dcdit evaluate``;
* :mod:`.router_analysis`, :mod:`.denoiser` – what a trained model does per timestep.

The argument parsing of ``dcdit evaluate`` / ``train-classifier`` / ``analyze-router`` lives in
:mod:`dcdit.cli_evaluation`.
"""

from . import evaluate, extractors, images, metrics, mnist_classifier, mnist_training, reference, router_analysis
from .evaluate import *  # noqa: F401,F403 - each module's __all__ is its public API
from .extractors import *  # noqa: F401,F403
from .images import *  # noqa: F401,F403
from .metrics import *  # noqa: F401,F403
from .mnist_classifier import *  # noqa: F401,F403
from .mnist_training import *  # noqa: F401,F403
from .reference import *  # noqa: F401,F403
from .router_analysis import *  # noqa: F401,F403

__all__ = [
    *metrics.__all__,
    *images.__all__,
    *extractors.__all__,
    *reference.__all__,
    *mnist_classifier.__all__,
    *mnist_training.__all__,
    *evaluate.__all__,
    *router_analysis.__all__,
]

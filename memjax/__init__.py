"""memjax: train big models in small memory, in JAX.

Subpackages (import them explicitly; nothing heavy happens at import time):

* :mod:`memjax.optim`   -- optax ``GradientTransformation`` s: low-rank projection
  (GaLore, DCT, random), residual policies, quantized state, zeroth-order SPSA.
* :mod:`memjax.models`  -- Flax NNX sequence layers and a decoder LM.
* :mod:`memjax.kernels` -- functional cores with XLA and Pallas implementations.
* :mod:`memjax.training` -- whole training steps, e.g. the layerwise step (the optimizer inside
  the backward pass).
"""

__version__ = "0.1.0"

from memjax import kernels, models, optim, training  # noqa: E402

__all__ = ["kernels", "models", "optim", "training", "__version__"]

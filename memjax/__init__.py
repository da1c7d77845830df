"""memjax: train big models in small memory, in JAX.

Subpackages (import them explicitly; nothing heavy happens at import time):

* :mod:`memjax.optim`   -- optax ``GradientTransformation`` s: low-rank projection
  (GaLore, DCT, random), residual policies, quantized state, zeroth-order SPSA.
* :mod:`memjax.models`  -- Flax NNX sequence layers and a decoder LM.
* :mod:`memjax.kernels` -- functional cores with XLA and Pallas implementations.
"""

__version__ = "0.1.0"

from memjax import kernels, models, optim  # noqa: E402

__all__ = ["kernels", "models", "optim", "__version__"]

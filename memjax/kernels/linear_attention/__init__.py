"""(Decayed) linear attention: references, a chunkwise XLA form, dispatch and one-token decoding.

See :mod:`memjax.kernels.linear_attention.ops` for the math and the public contract.
"""

from memjax.kernels.linear_attention.chunked import linear_attention_chunked
from memjax.kernels.linear_attention.ops import (
    LinearAttentionState,
    lightning_decay,
    lightning_slopes,
    linear_attention,
    linear_attention_step,
)
from memjax.kernels.linear_attention.reference import (
    linear_attention_quadratic,
    linear_attention_recurrent,
)

__all__ = [
    "LinearAttentionState",
    "lightning_decay",
    "lightning_slopes",
    "linear_attention",
    "linear_attention_chunked",
    "linear_attention_quadratic",
    "linear_attention_recurrent",
    "linear_attention_step",
]

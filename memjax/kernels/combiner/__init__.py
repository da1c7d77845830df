"""Combiner attention (Ren et al. 2021, arXiv 2107.05768): full attention at O(L sqrt L) cost.

* :func:`combiner_attention` -- the blocked O(L sqrt L) implementation (``ops.py``).
* :func:`combiner_attention_reference` -- the dense definition building p(j | i) (``reference.py``).
"""

from memjax.kernels.combiner.ops import MODES, combiner_attention
from memjax.kernels.combiner.reference import (
    combiner_attention_reference,
    combiner_probabilities,
    combiner_regions,
    default_block_size,
)

__all__ = [
    "MODES",
    "combiner_attention",
    "combiner_attention_reference",
    "combiner_probabilities",
    "combiner_regions",
    "default_block_size",
]

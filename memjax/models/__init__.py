"""Flax NNX sequence layers and a decoder language model.

Mixers (``__call__(x)``: (batch, length, d_model) -> same): :class:`CausalSelfAttention`,
:class:`Mamba`, :class:`LinearAttention`, :class:`CombinerAttention`,
:class:`ScatterbrainAttention`; the decoder :class:`LM` plugs any of them in by name.
"""

from memjax.models.attention import CausalSelfAttention, KVCache
from memjax.models.combiner import CombinerAttention
from memjax.models.layers import RMSNorm, SwiGLU, partitioned, rope
from memjax.models.linear_attention import HedgehogFeatureMap, LinearAttention, LinearAttentionCache
from memjax.models.lm import (
    LM,
    MIXERS,
    PRESETS,
    RECURRENT_MIXERS,
    REMAT_POLICIES,
    LMConfig,
    generate,
    lm_preset,
    next_token_loss,
    num_params,
)
from memjax.models.mamba import BidirectionalMamba, Mamba, MambaCache, ResidualVisionMamba
from memjax.models.scatterbrain import RandomFeatures, ScatterbrainAttention

__all__ = [
    "BidirectionalMamba",
    "CausalSelfAttention",
    "CombinerAttention",
    "HedgehogFeatureMap",
    "KVCache",
    "LM",
    "LMConfig",
    "LinearAttention",
    "LinearAttentionCache",
    "MIXERS",
    "Mamba",
    "MambaCache",
    "PRESETS",
    "RECURRENT_MIXERS",
    "REMAT_POLICIES",
    "RMSNorm",
    "RandomFeatures",
    "ResidualVisionMamba",
    "ScatterbrainAttention",
    "SwiGLU",
    "generate",
    "lm_preset",
    "next_token_loss",
    "num_params",
    "partitioned",
    "rope",
]

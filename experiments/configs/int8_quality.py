"""INT8 weights at equal steps on the main job's model and data (``default``): each recipe with
float weights, with INT8 weights re-quantised by stochastic rounding (the authors') and by
round-to-nearest (for comparison), every row a layerwise step.

Q-GaLore (INT4 projector, 8-bit moments; INT8 groups of 256) and APOLLO-Mini (INT8 groups of 128,
Q-APOLLO-Mini) at their main-job learning rates. ``python -m experiments.train --config
int8_quality`` (about 10 minutes on 2 CPU cores); BENCHMARKS.md, section 13.
"""

import dataclasses

from ..config import OptimizerConfig
from .default import CONFIG as DEFAULT

_Q_GALORE = dict(name="q_galore", learning_rate=1e-2, rank=16, update_proj_gap=50, scale=0.25,
                 layerwise=True)
_APOLLO_MINI = dict(name="apollo_mini", learning_rate=1e-2, update_proj_gap=50, layerwise=True)

CONFIG = dataclasses.replace(
    DEFAULT,
    optimizers=(
        OptimizerConfig(**_Q_GALORE),
        OptimizerConfig(**_Q_GALORE, weight_bits=8, weight_group_size=256),
        OptimizerConfig(**_Q_GALORE, weight_bits=8, weight_group_size=256,
                        weight_rounding="nearest"),
        OptimizerConfig(**_APOLLO_MINI),
        OptimizerConfig(**_APOLLO_MINI, weight_bits=8, weight_group_size=128),
        OptimizerConfig(**_APOLLO_MINI, weight_bits=8, weight_group_size=128,
                        weight_rounding="nearest"),
    ),
    memory_presets=(),
)

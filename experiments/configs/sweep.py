"""The default model and data with AdamW and GaLore's three projectors (svd, dct, random)."""

import dataclasses

from experiments.config import OptimizerConfig
from experiments.configs.default import CONFIG as DEFAULT

_GALORE = dict(name="galore", learning_rate=1e-2, rank=16, update_proj_gap=50, scale=0.25)

CONFIG = dataclasses.replace(
    DEFAULT,
    optimizers=(
        OptimizerConfig(name="adamw", learning_rate=3e-3),
        OptimizerConfig(**_GALORE, projector="svd"),
        OptimizerConfig(**_GALORE, projector="dct"),
        OptimizerConfig(**_GALORE, projector="random"),
    ),
)

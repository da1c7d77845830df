"""The default model and data with every optimizer: AdamW, GaLore's three projectors (svd, dct,
random), Fira, APOLLO, APOLLO-Mini, FRUGAL (block), Q-GaLore and MeZO, 2000 steps each.

Learning rates follow each paper's recipe shape at this scale: the projected recipes use the
GaLore authors' larger rate (1e-2) with rank 16 < d_model = 64; FRUGAL's Adam part uses AdamW's
rate; MeZO (forward passes only) uses a small constant-ish rate, as zeroth-order SGD requires.
About 45 minutes on 2 CPU cores: ``python -m experiments.train --config sweep``.
"""

import dataclasses

from ..config import EvalConfig, OptimizerConfig, ScheduleConfig
from .default import CONFIG as DEFAULT

_LOW_RANK = {"learning_rate": 1e-2, "rank": 16, "update_proj_gap": 50}

CONFIG = dataclasses.replace(
    DEFAULT,
    optimizers=(
        OptimizerConfig(name="adamw", learning_rate=3e-3),
        OptimizerConfig(name="galore", **_LOW_RANK, scale=0.25, projector="svd"),
        OptimizerConfig(name="galore", **_LOW_RANK, scale=0.25, projector="dct"),
        OptimizerConfig(name="galore", **_LOW_RANK, scale=0.25, projector="random"),
        OptimizerConfig(name="fira", **_LOW_RANK, scale=0.25),
        OptimizerConfig(name="apollo", **_LOW_RANK),
        OptimizerConfig(name="apollo_mini", learning_rate=1e-2, update_proj_gap=50),
        OptimizerConfig(name="frugal", learning_rate=3e-3, subspace="block", density=0.25,
                        update_proj_gap=50),
        OptimizerConfig(name="q_galore", **_LOW_RANK, scale=0.25),
        OptimizerConfig(name="mezo", learning_rate=3e-4, zo_eps=1e-3, zo_samples=1),
    ),
    schedule=ScheduleConfig(steps=2000),
    eval=EvalConfig(every=250, batches=4),
    memory_presets=(),
)

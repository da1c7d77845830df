"""Seconds on a CPU: a 1-layer d=32 model, 40 steps of AdamW, GaLore, layerwise GaLore (the
optimizer inside the backward pass: the same updates as galore-svd) and layerwise Q-GaLore over
INT8 weights with stochastic rounding (tests, CI, quick checks)."""

from ..config import (CheckpointConfig, Config, DataConfig, EvalConfig, LogConfig,
                      ModelConfig, OptimizerConfig, ScheduleConfig)

CONFIG = Config(
    seed=0,
    model=ModelConfig(vocab_size=256, d_model=32, num_layers=1, num_heads=2, ffn_dim=64),
    optimizers=(
        OptimizerConfig(name="adamw", learning_rate=3e-3),
        OptimizerConfig(name="galore", learning_rate=1e-2, rank=8, update_proj_gap=10),
        OptimizerConfig(name="galore", learning_rate=1e-2, rank=8, update_proj_gap=10,
                        layerwise=True),
        OptimizerConfig(name="q_galore", learning_rate=1e-2, rank=8, update_proj_gap=10,
                        layerwise=True, weight_bits=8, weight_group_size=128),
    ),
    data=DataConfig(source="stdlib", seq_len=32, batch_size=8, max_corpus_bytes=300_000),
    schedule=ScheduleConfig(steps=40),
    eval=EvalConfig(every=20, batches=2),
    checkpoint=CheckpointConfig(every=10),
    log=LogConfig(log_every=5, plots=False),
)

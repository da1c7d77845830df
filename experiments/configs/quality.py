"""The training-quality study's model and data (BENCHMARKS.md, section 16): a LLaMA-style byte LM
at d_model 128 (4 layers, 4 heads, SwiGLU 344), 128-token sequences, batch 16, warmup + cosine,
rank 32 (r / d = 0.25 as in the papers' 60M runs: 128 / 512), refresh period T = 200.

This config trains tuned AdamW and GaLore; ``python -m benchmarks.quality`` runs the whole study
(learning-rate sweeps, every method at the rate its sweep found, two seeds, table and plot) on top
of it, resumably.
"""

from ..config import (CheckpointConfig, Config, DataConfig, EvalConfig, LogConfig,
                      ModelConfig, OptimizerConfig, ScheduleConfig)

CONFIG = Config(
    seed=0,
    model=ModelConfig(vocab_size=256, d_model=128, num_layers=4, num_heads=4, ffn_dim=344),
    optimizers=(
        OptimizerConfig(name="adamw", learning_rate=3e-3),
        OptimizerConfig(name="galore", learning_rate=1e-2, rank=32, update_proj_gap=200,
                        scale=0.25, projector="svd"),
    ),
    data=DataConfig(source="stdlib", seq_len=128, batch_size=16),
    schedule=ScheduleConfig(steps=1500),
    eval=EvalConfig(every=250, batches=8),
    checkpoint=CheckpointConfig(every=250),
    log=LogConfig(log_every=25, progress=False),
)

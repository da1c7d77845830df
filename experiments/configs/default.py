"""The main job: a tiny LLaMA-style byte LM on the built-in stdlib corpus, AdamW vs GaLore.

Same model, data, steps and seed for both; about a few minutes on 2 CPU cores. The job ends with
the compiled memory of one train step of both optimizers at LLaMA-1B and LLaMA-7B (shape-only, see
:mod:`experiments.memory`): at this toy size GaLore saves little, at 7B it saves about a third.
GaLore uses the authors' recipe shape (larger learning rate, scale 0.25, rank < d_model) on every
attention and MLP matrix; embeddings, head and norms get plain Adam.
"""

from ..config import (CheckpointConfig, Config, DataConfig, EvalConfig, ModelConfig,
                      OptimizerConfig, ScheduleConfig)

CONFIG = Config(
    seed=0,
    model=ModelConfig(vocab_size=256, d_model=64, num_layers=2, num_heads=4, ffn_dim=172),
    optimizers=(
        OptimizerConfig(name="adamw", learning_rate=3e-3),
        OptimizerConfig(name="galore", learning_rate=1e-2, rank=16, update_proj_gap=50, scale=0.25,
                        projector="svd"),
    ),
    data=DataConfig(source="stdlib", seq_len=128, batch_size=16),
    schedule=ScheduleConfig(steps=300),
    eval=EvalConfig(every=50, batches=4),
    checkpoint=CheckpointConfig(every=100),
    # Then the same optimizers at real sizes, shape-only (nothing allocated): what they save there.
    memory_presets=("llama_1b", "llama_7b"),
)

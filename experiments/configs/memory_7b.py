"""LLaMA-7B memory, the GaLore paper's setting (Fig. 1, Sec. 5.5): one 256-token sequence, no remat.

For the planner, not for training (``python -m experiments.memory --config memory_7b``): float32
(XLA:CPU upcasts bf16 dots, so bf16 figures from a CPU overstate; the paper's figures are BF16),
rows ``adamw``, ``adamw-8bit`` (blockwise 8-bit moments), ``galore`` (rank 1024, the authors' 7B
rank), ``galore-8bit``, ``galore-8bit-layerwise`` and ``apollo-mini-layerwise`` (each layer updated
inside the backward pass: no gradient tree; the paper's per-layer weight updates),
``q-galore-int8-layerwise`` (Q-GaLore: INT4 projectors, 8-bit moments, the blocks' weights in INT8
groups of 256 re-quantised with stochastic rounding) and ``apollo-mini-int8-layerwise``
(Q-APOLLO-Mini: INT8 groups of 128), and ``mezo`` (forward passes only). Each row compiles in seconds; nothing is
allocated.
"""

from ..config import Config, DataConfig, ModelConfig, OptimizerConfig

_GALORE = {"name": "galore", "rank": 1024, "update_proj_gap": 200, "scale": 0.25,
           "learning_rate": 1e-2}

CONFIG = Config(
    seed=0,
    model=ModelConfig(vocab_size=32000, d_model=4096, num_layers=32, num_heads=32, ffn_dim=11008,
                      remat="none", dtype="float32", param_dtype="float32"),
    optimizers=(
        OptimizerConfig(name="adamw", label="adamw", learning_rate=1e-4),
        OptimizerConfig(name="adamw", label="adamw-8bit", learning_rate=1e-4, adam_bits=8),
        OptimizerConfig(label="galore", **_GALORE),
        OptimizerConfig(label="galore-8bit", adam_bits=8, **_GALORE),
        OptimizerConfig(label="galore-8bit-layerwise", adam_bits=8, layerwise=True, **_GALORE),
        OptimizerConfig(name="apollo_mini", label="apollo-mini-layerwise", learning_rate=1e-2,
                        update_proj_gap=200, layerwise=True),
        OptimizerConfig(name="q_galore", label="q-galore-int8-layerwise", rank=1024,
                        update_proj_gap=200, learning_rate=1e-2, layerwise=True, weight_bits=8,
                        weight_group_size=256),
        OptimizerConfig(name="apollo_mini", label="apollo-mini-int8-layerwise", learning_rate=1e-2,
                        update_proj_gap=200, layerwise=True, weight_bits=8, weight_group_size=128),
        OptimizerConfig(name="mezo", label="mezo", learning_rate=1e-6),
    ),
    data=DataConfig(source="stdlib", seq_len=256, batch_size=1),
)

"""A peer 8-bit Adam on the same CPU: torchao's ``AdamW8bit`` vs torch's AdamW, LLaMA-60M tree.

Not part of the test environment (it needs torch and torchao). In a separate venv:

    python -m venv /tmp/peer && /tmp/peer/bin/pip install torch torchao numpy
    /tmp/peer/bin/python benchmarks/peer_adam8bit.py

Times ``optimizer.step()`` (gradients set once, median of 8 steps after 2 warm-up steps that
include torch.compile of torchao's fused step) on the parameter shapes of
``benchmarks.optim_memory.llama_tree`` (d 512, ffn 1376, 8 layers, vocab 32000: 58M parameters),
float32, with as many threads as JAX uses here (2). Compare with the ``optax.adamw`` and
``memjax adamw 8-bit`` rows of ``python -m benchmarks.optim_memory``.
"""

import time

import torch
from torchao.optim import AdamW8bit

D, FFN, LAYERS, VOCAB = 512, 1376, 8, 32000
SHAPES = ([(VOCAB, D), (D, VOCAB), (D,)]
          + LAYERS * ([(D, D)] * 4 + [(D, FFN), (D, FFN), (FFN, D), (D,), (D,)]))


def step_ms(optimizer_class, steps=8, **kwargs) -> float:
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(0.02 * torch.randn(s, generator=generator)) for s in SHAPES]
    for p in params:
        p.grad = 0.02 * torch.randn(p.shape, generator=generator)
    optimizer = optimizer_class(params, lr=1e-3, eps=1e-6, weight_decay=1e-4, **kwargs)
    optimizer.step()
    optimizer.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[steps // 2]


def main():
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, {sum(torch.Size(s).numel() for s in SHAPES) / 1e6:.1f}M "
          "params, float32, 2 threads; median ms per step")
    for _ in range(2):  # two rounds: the spread is the machine's noise
        print(f"torch AdamW (foreach) {step_ms(torch.optim.AdamW, foreach=True):.1f}")
        print(f"torch AdamW (fused) {step_ms(torch.optim.AdamW, fused=True):.1f}")
        print(f"torchao AdamW8bit {step_ms(AdamW8bit):.1f}")


if __name__ == "__main__":
    main()

"""Orthogonality after a step: largest ``||X^T X - I||_F`` (float64) over a few float32
StiefelAdamW steps on random gradients, per retraction, shape and learning rate.

The table behind README's "Retractions" guarantee. CPU by default::

    python bench/orthogonality_after_step.py [--backend torch] [--steps 3] [--device cpu]
"""
from __future__ import annotations

import argparse
import platform

import torch

from stiefel_kernels import StiefelAdamW, gram, random_stiefel
from stiefel_kernels.geometry import orthogonality_error

#: (label, stored shape): n >> r, n = 12 r, n = 8 r at rank 128, n = 1.5 r, n = r
SHAPES = [
    ("LoRA A 16x4096", (16, 4096)),
    ("4x10^6", (4, 1_000_000)),
    ("GPT-2 QK 768x64", (768, 64)),
    ("128x1024", (128, 1024)),
    ("64x96", (64, 96)),
    ("64x64", (64, 64)),
]
LRS = [1e-3, 1e-1, 10.0]


def worst_error(shape, lr, retraction, backend, steps, device, seed=0) -> float:
    gen = torch.Generator().manual_seed(seed)
    p = torch.nn.Parameter(random_stiefel(*shape, generator=gen).to(device))
    opt = StiefelAdamW([{"params": [p], "stiefel": True}], lr=lr, retraction=retraction,
                       backend=backend)
    worst = 0.0
    for _ in range(steps):
        p.grad = torch.randn(shape, generator=gen).to(device)
        opt.step()
        worst = max(worst, float(orthogonality_error(p).max()))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"backend {args.backend}, device {args.device}, float32, worst of {args.steps} steps")
    cols = [(label, shape, lr) for label, shape in SHAPES for lr in LRS]
    print("| retraction | " + " | ".join(f"{label} @ {lr:g}" for label, _, lr in cols) + " |")
    print("| --- |" + " ---: |" * len(cols))
    for retraction in gram.RETRACTIONS:
        errs = [worst_error(shape, lr, retraction, args.backend, args.steps, args.device)
                for _, shape, lr in cols]
        print(f"| `{retraction}` | " + " | ".join(f"{e:.1e}" for e in errs) + " |", flush=True)


if __name__ == "__main__":
    main()

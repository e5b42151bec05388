"""Learning-rate stability on the rank-r recovery problem (the talk's "Gradient Boundedness &
Learning Rate Stability" slide).

    minimize  L(A, B) = 1/2 ||B A - alpha I_n||_F^2,   A: r x n,  B: n x r,  B_0 = 0.

Euclidean GD / AdamW on (A, B) against Stiefel GD / Stiefel-AdamW (A kept row-orthonormal) over
a sweep of learning rates. The best reachable loss is ``alpha^2 (n - r) / 2``; we report the final
loss divided by it (1.0 = solved) and mark runs that diverged (non-finite or growing loss).

Run:  python python/lr_stability.py            (CPU, well under a minute)
      python python/lr_stability.py --help     (sizes, steps, learning rates, retraction, plot path)
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch

import stiefel_kernels as sk
from stiefel_kernels import StiefelAdamW


def loss_of(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    w = b @ a
    return 0.5 * ((w - alpha * torch.eye(w.shape[0], dtype=w.dtype)) ** 2).sum()


def run_method(method: str, lr: float, a0: torch.Tensor, alpha: float, steps: int, retraction: str) -> list[float]:
    """Train from (A0, B=0) with one method; returns the loss after every step."""
    n, r = a0.shape[1], a0.shape[0]
    a = a0.clone().requires_grad_()
    b = torch.zeros(n, r, dtype=a0.dtype, requires_grad=True)
    if method == "AdamW":
        opt = torch.optim.AdamW([a, b], lr=lr, weight_decay=0.0)
    elif method == "Stiefel-AdamW":
        opt = StiefelAdamW([{"params": [a], "stiefel": True}, {"params": [b]}], lr=lr,
                           weight_decay=0.0, retraction=retraction)
    elif method in ("GD", "Stiefel GD"):
        opt = None
    else:
        raise ValueError(method)
    history = []
    for _ in range(steps):
        loss = loss_of(a, b, alpha)
        history.append(loss.item())
        if not math.isfinite(history[-1]) or history[-1] > 1e12:
            history[-1] = math.inf
            break
        a.grad = b.grad = None
        loss.backward()
        if opt is not None:
            opt.step()
            continue
        with torch.no_grad():
            b -= lr * b.grad
            if method == "GD":
                a -= lr * a.grad
            else:  # Riemannian GD: project the Euclidean gradient, retract (column form X = A^T)
                x = sk.as_column_form(a)
                xi = -lr * sk.project_tangent(x, sk.as_column_form(a.grad))
                x.copy_(sk.retract_polar(x, xi))
    else:
        history.append(loss_of(a, b, alpha).item())
    return history


def summarize(history: list[float], best: float) -> tuple[float, bool]:
    final = history[-1]
    diverged = not math.isfinite(final) or final > 2.0 * history[0]
    return final / best, diverged


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=32, help="ambient size n (W is n x n)")
    ap.add_argument("--r", type=int, default=4, help="rank r")
    ap.add_argument("--alpha", type=float, default=4.0, help="target scale alpha")
    ap.add_argument("--steps", type=int, default=400, help="optimizer steps per run")
    ap.add_argument("--lrs", type=str, default="1e-3,3e-3,1e-2,3e-2,0.1,0.2,0.3,0.5,1.0,1.5",
                    help="comma-separated learning rates")
    ap.add_argument("--retraction", default="cayley_fp", help="retraction of Stiefel-AdamW")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", default="lr_stability.png", help="PNG path ('' for none)")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # 32 x 4 matrices: thread hand-offs cost more than they save
    dtype = torch.float64
    a0 = sk.random_stiefel(args.r, args.n, dtype=dtype)
    best = 0.5 * args.alpha**2 * (args.n - args.r)
    lrs = [float(s) for s in args.lrs.split(",")]
    methods = ["GD", "Stiefel GD", "AdamW", "Stiefel-AdamW"]

    print(f"rank-{args.r} recovery of {args.alpha} * I_{args.n}: L = 1/2 ||B A - alpha I||_F^2, B_0 = 0, "
          f"{args.steps} steps; entries are final loss / optimal loss ({best:g}), '   div' = diverged")
    t0 = time.perf_counter()
    results: dict[str, list[tuple[float, bool]]] = {m: [] for m in methods}
    for lr in lrs:
        for m in methods:
            results[m].append(summarize(run_method(m, lr, a0, args.alpha, args.steps, args.retraction), best))
    header = f"{'lr':>8} | " + " | ".join(f"{m:>13}" for m in methods)
    print(header)
    print("-" * len(header))
    for i, lr in enumerate(lrs):
        cells = []
        for m in methods:
            ratio, div = results[m][i]
            cells.append(f"{'div':>13}" if div else f"{ratio:13.4f}")
        print(f"{lr:8.3g} | " + " | ".join(cells))
    stable = {m: [lr for lr, (ratio, div) in zip(lrs, results[m]) if not div and ratio < 1.01] for m in methods}
    print()
    for m in methods:
        top = max(stable[m]) if stable[m] else None
        print(f"{m:>13}: solved (final/optimal < 1.01) for {len(stable[m])}/{len(lrs)} learning rates, "
              f"largest {top}")
    print(f"({time.perf_counter() - t0:.1f} s)")

    if args.plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
            return 0
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for m, style in zip(methods, ["o--", "s-", "^--", "D-"]):
            ys = [min(ratio, 1e3) if not div else 1e3 for ratio, div in results[m]]
            ax.plot(lrs, ys, style, label=m)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xlabel("learning rate")
        ax.set_ylabel("final loss / optimal loss (1e3 = diverged)")
        ax.set_title(f"rank-{args.r} recovery of {args.alpha:g} I_{args.n}, {args.steps} steps")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

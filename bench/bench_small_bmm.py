"""Time ``torch.ops.stiefel_kernels.small_bmm`` (the native CPU kernel of the small step's
``r x r`` products) against torch's ``bmm`` / ``baddbmm`` on the batch shapes the optimizer runs.

Not a test. Medians over ``--rounds`` (alternating the two, same inputs, one process), GFLOP/s,
and the ratio; with ``--out`` also a Markdown table.

    python bench/bench_small_bmm.py                      # 1 and 2 threads
    python bench/bench_small_bmm.py --threads 1 --rounds 51
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import stiefel_kernels  # noqa: F401  (registers the ops)
from stiefel_kernels import _native

# (label, batch, m, k, n)
CASES = [
    ("GPT-2 QK, r = 64", 144, 64, 64, 64),
    ("LoRA r = 16, 32 layers", 224, 16, 16, 16),
    ("LoRA r = 64, 32 layers", 224, 64, 64, 64),
    ("r = 128", 48, 128, 128, 128),
    ("Cayley 2r x 2r @ 2r x r, r = 64", 144, 128, 128, 64),
]


def _median_ms(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=31)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch._C._dispatch_has_kernel_for_dispatch_key("stiefel_kernels::small_bmm", "CPU"):
        raise SystemExit(f"the native kernel is not built (stiefel_kernels._C: {_native.load_error})")
    op = torch.ops.stiefel_kernels.small_bmm
    rows = ["| case | shape (B, m, k, n) | threads | torch bmm ms | small_bmm ms | ratio | "
            "torch GFLOP/s | small_bmm GFLOP/s |", "|---|---|---|---|---|---|---|---|"]
    gen = torch.Generator().manual_seed(0)
    for threads in args.threads:
        torch.set_num_threads(threads)
        for label, b, m, k, n in CASES:
            x = torch.randn(b, m, k, generator=gen)
            y = torch.randn(b, k, n, generator=gen)
            d = torch.randn(b, m, n, generator=gen)
            ours = lambda: op(x, y, d, 1.0)  # noqa: E731
            theirs = lambda: torch.baddbmm(d, x, y)  # noqa: E731
            for _ in range(3):
                ours(), theirs()
            t_ours, t_theirs = [], []
            for _ in range(args.rounds):
                t_theirs.append(_median_ms(theirs, 1))
                t_ours.append(_median_ms(ours, 1))
            mo, mt = statistics.median(t_ours), statistics.median(t_theirs)
            gf = 2 * b * m * k * n / 1e6
            rows.append(f"| {label} | ({b}, {m}, {k}, {n}) | {threads} | {mt:.3f} | {mo:.3f} | "
                        f"{mo / mt:.2f} | {gf / mt:.0f} | {gf / mo:.0f} |")
            print(rows[-1], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()

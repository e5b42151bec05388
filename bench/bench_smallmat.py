"""Batched small-matrix step: native ops (stiefel_kernels._C) vs torch.linalg vs Newton–Schulz.

pytest-benchmark (not collected by the test suite; run explicitly):
    pytest bench/bench_smallmat.py --benchmark-columns=median,iqr,rounds -k "float32"
Table of medians (CPU, or the GPU with --device cuda; paste it under bench/results/):
    python bench/bench_smallmat.py [--device cpu|cuda] [--dtype float32|float64] [--threads N]

The torch.linalg side is exactly the default kernel of the ops (stiefel_kernels.ops): cholesky_ex +
solve_triangular, solve_ex, and eigh-based inverse square root; the Newton–Schulz side is
smallmat.inv_sqrt_spd_newton_schulz (20 coupled steps, matrix products only). Inputs resemble the
optimizer's r x r step: SPD Gram matrices with condition number 10, and for solve a general
nonsingular A with k right-hand sides. Timings come from torch.utils.benchmark (which
synchronizes CUDA around each measurement).
"""
from __future__ import annotations

import argparse
import math
import platform

import pytest
import torch

from stiefel_kernels import _native, smallmat

BATCHES = [32, 256, 1024]
SIZES = [8, 16, 32, 64, 128, 256]
OPS = ["inv_sqrt_spd", "cholesky_upper_inverse", "solve"]
METHODS = {
    "inv_sqrt_spd": {"native": None, "torch": smallmat.inv_sqrt_spd_torch,
                     "newton_schulz": smallmat.inv_sqrt_spd_newton_schulz},
    "cholesky_upper_inverse": {"native": None, "torch": smallmat.cholesky_upper_inverse_torch},
    "solve": {"native": None, "torch": smallmat.solve_torch},
}


def make_inputs(op: str, batch: int, k: int, dtype: torch.dtype, device: str = "cpu",
                seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(batch, k, k, generator=gen, dtype=torch.float64))
    lam = torch.logspace(0, 1, k, dtype=torch.float64)
    if op == "solve":
        q2, _ = torch.linalg.qr(torch.randn(batch, k, k, generator=gen, dtype=torch.float64))
        a = (q * lam.unsqueeze(-2)) @ q2.mT
        b = torch.randn(batch, k, k, generator=gen, dtype=torch.float64)
        return a.to(dtype=dtype, device=device), b.to(dtype=dtype, device=device)
    m = (q * lam.unsqueeze(-2)) @ q.mT
    return ((m + m.mT) / 2).to(dtype=dtype, device=device),


def _enable_native(device: str) -> None:
    """The native CUDA kernels are opt-in (stiefel_kernels.ops): measuring them means enabling
    them (a CUDA build of the extension)."""
    if device == "cuda" and _native.available and _native._C.with_cuda:
        _native.enable_cuda_kernels()


def impl(op: str, method: str, device: str = "cpu"):
    if method == "native":
        _enable_native(device)
        if not _native.has_op(op, device):
            pytest.skip(f"native extension has no {device} kernel for {op}")
        return getattr(torch.ops.stiefel_kernels, op)
    return METHODS[op][method]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("k", SIZES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("method", ["native", "torch", "newton_schulz"])
@pytest.mark.parametrize("op", OPS)
def test_smallmat(benchmark, op, method, batch, k, dtype):
    if method not in METHODS[op]:
        pytest.skip(f"no {method} formulation of {op}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fn = impl(op, method, device)
    args = make_inputs(op, batch, k, getattr(torch, dtype), device)
    benchmark.group = f"{op} {dtype} {device} batch={batch} k={k}"
    out, info = benchmark(fn, *args)
    assert (info == 0).all()


def main() -> None:
    from torch.utils import benchmark as tb

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batches", type=int, nargs="*", default=BATCHES)
    parser.add_argument("--sizes", type=int, nargs="*", default=SIZES)
    parser.add_argument("--ops", nargs="*", default=OPS, choices=OPS)
    parser.add_argument("--min-run-time", type=float, default=0.2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if args.device == "cuda":
        where = torch.cuda.get_device_name()
    else:
        where = f"{platform.processor() or platform.machine()}, {args.threads} threads"
    print(f"{where}; torch {torch.__version__}; {args.dtype}; median time per call (whole batch); "
          "x = best other / native")
    header = (f"| {'op':24s} | {'batch':>5s} | {'k':>4s} | {'native':>10s} | {'torch.linalg':>12s} "
              f"| {'newton_schulz':>13s} | {'x':>6s} |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for op in args.ops:
        for batch in args.batches:
            for k in args.sizes:
                inputs = make_inputs(op, batch, k, dtype, args.device)
                times = {}
                _enable_native(args.device)
                for method in METHODS[op]:
                    if method == "native" and not _native.has_op(op, args.device):
                        continue
                    fn = impl(op, method, args.device)
                    timer = tb.Timer("fn(*inputs)", globals={"fn": fn, "inputs": inputs},
                                     num_threads=args.threads)
                    times[method] = timer.blocked_autorange(min_run_time=args.min_run_time).median
                others = [t for m, t in times.items() if m != "native"]
                ratio = f"{min(others) / times['native']:5.2f}x" if "native" in times else "  -  "
                cells = [_fmt(times[m]) if m in times else "-"
                         for m in ("native", "torch", "newton_schulz")]
                print(f"| {op:24s} | {batch:5d} | {k:4d} | {cells[0]:>10s} | {cells[1]:>12s} "
                      f"| {cells[2]:>13s} | {ratio:>6s} |", flush=True)


def _fmt(seconds: float) -> str:
    exp = math.floor(math.log10(seconds)) if seconds > 0 else 0
    if exp < -3:
        return f"{seconds * 1e6:.1f} us"
    if exp < 0:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


if __name__ == "__main__":
    main()

"""Batched small-matrix step: native ops (stiefel_kernels._C) vs their torch.linalg formulations.

pytest-benchmark (not collected by the test suite; run explicitly):
    pytest bench/bench_smallmat.py --benchmark-columns=median,iqr,rounds -k "float32"
Table of medians:
    python bench/bench_smallmat.py [--dtype float32|float64] [--threads N]

The torch.linalg side is exactly the fallback of stiefel_kernels.smallmat: cholesky_ex +
solve_triangular, solve_ex, and eigh-based inverse square root. Inputs resemble the optimizer's
r x r step: SPD Gram matrices with condition number 10, and for solve a general nonsingular A
with k right-hand sides.
"""
from __future__ import annotations

import argparse
import math

import pytest
import torch

from stiefel_kernels import _native, smallmat

BATCHES = [32, 256, 1024]
SIZES = [8, 16, 32, 64, 128]
OPS = ["inv_sqrt_spd", "cholesky_upper_inverse", "solve"]
TORCH_IMPL = {
    "inv_sqrt_spd": smallmat.inv_sqrt_spd_torch,
    "cholesky_upper_inverse": smallmat.cholesky_upper_inverse_torch,
    "solve": smallmat.solve_torch,
}


def make_inputs(op: str, batch: int, k: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(batch, k, k, generator=gen, dtype=torch.float64))
    lam = torch.logspace(0, 1, k, dtype=torch.float64)
    if op == "solve":
        q2, _ = torch.linalg.qr(torch.randn(batch, k, k, generator=gen, dtype=torch.float64))
        a = (q * lam.unsqueeze(-2)) @ q2.mT
        b = torch.randn(batch, k, k, generator=gen, dtype=torch.float64)
        return a.to(dtype), b.to(dtype)
    m = (q * lam.unsqueeze(-2)) @ q.mT
    return ((m + m.mT) / 2).to(dtype),


def impl(op: str, backend: str):
    if backend == "native":
        if not _native.has_op(op, "cpu"):
            pytest.skip("native extension not built")
        return getattr(torch.ops.stiefel_kernels, op)
    return TORCH_IMPL[op]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("k", SIZES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("op", OPS)
def test_smallmat(benchmark, op, backend, batch, k, dtype):
    fn = impl(op, backend)
    args = make_inputs(op, batch, k, getattr(torch, dtype))
    benchmark.group = f"{op} {dtype} batch={batch} k={k}"
    out, info = benchmark(fn, *args)
    assert (info == 0).all()


def main() -> None:
    from torch.utils import benchmark as tb

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batches", type=int, nargs="*", default=BATCHES)
    parser.add_argument("--sizes", type=int, nargs="*", default=SIZES)
    parser.add_argument("--min-run-time", type=float, default=0.2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if not _native.available:
        raise SystemExit(f"native extension not built: {_native.load_error}")
    print(f"torch {torch.__version__}, {args.dtype}, {args.threads} threads; median time per call "
          "(whole batch); speed-up = torch / native")
    header = f"{'op':24s} {'batch':>6s} {'k':>4s} {'native':>11s} {'torch.linalg':>13s} {'speed-up':>9s}"
    print(header)
    print("-" * len(header))
    for op in OPS:
        for batch in args.batches:
            for k in args.sizes:
                inputs = make_inputs(op, batch, k, dtype)
                times = {}
                for backend in ("native", "torch"):
                    fn = impl(op, backend)
                    timer = tb.Timer("fn(*inputs)", globals={"fn": fn, "inputs": inputs},
                                     num_threads=args.threads)
                    times[backend] = timer.blocked_autorange(min_run_time=args.min_run_time).median
                print(f"{op:24s} {batch:6d} {k:4d} {_fmt(times['native']):>11s} "
                      f"{_fmt(times['torch']):>13s} {times['torch'] / times['native']:8.2f}x",
                      flush=True)


def _fmt(seconds: float) -> str:
    exp = math.floor(math.log10(seconds)) if seconds > 0 else 0
    if exp < -3:
        return f"{seconds * 1e6:.1f} us"
    if exp < 0:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


if __name__ == "__main__":
    main()

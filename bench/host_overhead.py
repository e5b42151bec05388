"""Host time of one ``optimizer.step()`` with the device work taken out: StiefelAdamW's triton
backend against ``torch.optim.AdamW(fused=True)`` on the same parameter list (issue 12's
"host time per step within 1.5x of fused AdamW").

256 Stiefel factors (``16 x 64``, row-orthonormal) and their 256 Euclidean partners
(``64 x 16``) on the CPU; the Euclidean group is fused in both optimizers. Shapes are tiny so
the arithmetic is negligible, and inside this harness only the Triton kernel launches are
replaced by no-ops (the kernels' ``__getitem__`` returns a function that does nothing), so what
is left is the Python and dispatcher work a GPU step would also pay before its kernels run.
Medians of ``--steps`` steps after warm-up, one process, one thread::

    python bench/host_overhead.py [--factors 256] [--steps 200] [--profile]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # lets the triton backend accept CPU tensors
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import stiefel_kernels  # noqa: E402


class _NoLaunch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` does nothing."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def stub_launches():
    from stiefel_kernels.kernels import launch

    for name in ("stiefel_pass1_kernel", "stiefel_pass2_kernel", "small_step_kernel"):
        setattr(launch, name, _NoLaunch(getattr(launch, name)))


def make_params(factors: int, r: int, n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    a = [torch.nn.Parameter(stiefel_kernels.random_stiefel(r, n, generator=gen)) for _ in range(factors)]
    b = [torch.nn.Parameter(0.02 * torch.randn(n, r, generator=gen)) for _ in range(factors)]
    for p in a + b:
        p.grad = 0.01 * torch.randn(p.shape, generator=gen)
    return a, b


def host_ms(step, steps: int, warmup: int = 10) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--factors", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--profile", action="store_true", help="print the top host functions (cProfile)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    stub_launches()
    a, b = make_params(args.factors, args.rank, args.n)
    adamw = torch.optim.AdamW(a + b, lr=1e-3, fused=True)
    t_adamw = host_ms(adamw.step, args.steps)
    a, b = make_params(args.factors, args.rank, args.n)
    opt = stiefel_kernels.StiefelAdamW([{"params": a, "stiefel": True}, {"params": b, "fused": True}],
                                       lr=1e-3, backend="triton")
    t_stiefel = host_ms(opt.step, args.steps)
    a, b = make_params(args.factors, args.rank, args.n)
    eu = stiefel_kernels.StiefelAdamW([{"params": a + b, "fused": True}], lr=1e-3)
    t_euclid = host_ms(eu.step, args.steps)
    print(f"# host time per step, {args.factors} Stiefel {args.rank}x{args.n} + {args.factors} "
          f"Euclidean {args.n}x{args.rank}, Triton launches stubbed, torch {torch.__version__}, "
          f"1 thread, median of {args.steps}")
    print("| optimizer | host ms/step | x fused AdamW |\n| --- | --- | --- |")
    for name, t in (("torch.optim.AdamW(fused=True)", t_adamw),
                    ("StiefelAdamW, all groups Euclidean (fused)", t_euclid),
                    ("StiefelAdamW(backend='triton'), Euclidean group fused", t_stiefel)):
        print(f"| {name} | {t:.3f} | {t / t_adamw:.2f} |")
    if args.profile:
        import cProfile
        import pstats
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(50):
            opt.step()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where the time of one ``StiefelAdamW.step()`` goes: the torch profiler's table of device
kernels and host ops for one case and backend (the shapes of ``bench/bench_step.py``).

Usage (CUDA)::

    python bench/profile_step.py --case gpt2_qk --backend triton [--steps 5] [--rows 25]

Prints two tables (sorted by device time, then by host time) and the number of kernel launches
per step. ``--tiny`` allows the CPU (Triton interpreter): a check that the script runs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_step  # noqa: E402  (sets TRITON_INTERPRET on machines without CUDA)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", default="gpt2_qk", choices=bench_step.CASES)
    ap.add_argument("--backend", default="triton", choices=bench_step.BACKENDS + ("adamw_fused",))
    ap.add_argument("--retraction", default="cayley_fp")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.tiny:
        print("profile_step.py: no CUDA device (use --tiny to check the script on CPU)", file=sys.stderr)
        return 2
    a, b = bench_step.make_params(bench_step.make_case(args.case, args.tiny), device)
    opt = bench_step.make_optimizer(args.backend, a, b, args.retraction,
                                    "fused" if device == "cuda" else "default")
    for _ in range(3):
        opt.step()
    bench_step._sync(device)
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(args.steps):
            opt.step()
        bench_step._sync(device)
    ka = prof.key_averages()
    print(f"# profile: {args.case}, {args.backend}, {args.retraction}, {args.steps} steps on {device}")
    if device == "cuda":
        print(ka.table(sort_by="cuda_time_total", row_limit=args.rows))
        launches = sum(e.count for e in ka if e.device_type == torch.autograd.DeviceType.CUDA)
        print(f"device kernel launches per step: {launches / args.steps:.1f}")
    print(ka.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

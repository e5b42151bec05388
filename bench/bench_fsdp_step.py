"""Time ``StiefelAdamW.step()`` under FSDP2 per backend, and count the bytes each step moves.

Not a test. ``--world`` processes (gloo on the CPU, NCCL on CUDA: one GPU per rank) each hold a
model of ``F`` Stiefel factors sharded along their long side by
:func:`stiefel_kernels.distributed.stiefel_shard_placement_fn` (``fully_shard`` per factor),
gradients pre-filled (no forward/backward). Per backend, the median over ``--rounds`` of one
``opt.step()`` (a barrier before each round; on CUDA synchronized), on rank 0:

* ``torch`` / ``triton`` (CUDA only; under the CPU interpreter a timing means nothing): the
  local-shard path (:func:`stiefel_kernels.distributed.backend_step` hands the backend its local
  shards; one all-reduce of each bucket's stacked ``(K, G, H)``);
* ``torch, gathered``: the same backend declared without local-shard support, so every bucket
  takes the gather fallback (``full_tensor()`` of parameter, gradient and moments, the step on
  full tensors, the rank's slice kept): what a backend without local-shard support costs;
* ``reference``: the literal full-matrix backend (always gathered), on the smallest config only;
* ``AdamW (foreach)``: ``torch.optim.AdamW`` on the same DTensors, for scale (not a Stiefel step).

Bytes per step and rank: ``all-reduce`` is counted by wrapping ``torch.distributed.all_reduce``
(the Gram sums); ``gathered`` is what ``full_tensor()`` receives, ``(world - 1) / world`` of
every gathered tensor (parameter, gradient, two moments), counted from the shapes;
``local memory`` is the floor of the local passes (docs/design.md, "Memory traffic": 10 words
per local element, 7 for AdamW; a gathered step also reads and writes the full tensors).

    python bench/bench_fsdp_step.py                              # 2 gloo ranks on the CPU
    python bench/bench_fsdp_step.py --world 2 --rounds 21 --out bench/results/cpu-fsdp-step-DATE.md
    torchrun is not needed: the script spawns its ranks (on CUDA: --world <= GPUs).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: name: (description, shape of one factor, number of factors)
CONFIGS = {
    "lora_r16": ("LoRA r=16: 32 wide factors 16 x 4096", (16, 4096), 32),
    "gpt2_qk": ("GPT-2 QK: 48 tall factors 768 x 64", (768, 64), 48),
    "small": ("64 wide factors 8 x 512", (8, 512), 64),
}


class Factors(nn.Module):
    def __init__(self, shape, count, gen):
        super().__init__()
        from stiefel_kernels import random_stiefel

        self.blocks = nn.ModuleList()
        for _ in range(count):
            blk = nn.Module()
            blk.A = nn.Parameter(random_stiefel(*shape, generator=gen))
            self.blocks.append(blk)


def _gathered_torch_backend():
    """The torch backend declared without local-shard support: every bucket is gathered."""
    from stiefel_kernels.backends import FunctionBackend, get_backend, register_backend

    t = get_backend("torch")
    return register_backend(FunctionBackend("torch_gathered", t.unsupported_reason, t.step,
                                            reports_telemetry=True, steps_local_shards=False))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_steps(opt, device, rounds, warmup):
    for _ in range(warmup):
        opt.step()
    times = []
    for _ in range(rounds):
        _sync(device)
        dist.barrier()
        t0 = time.perf_counter()
        opt.step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    # the slowest rank decides a step's time
    t = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return statistics.median(t.tolist()) * 1e3


def _worker(rank, world, init_file, args, out_q):
    import warnings

    warnings.simplefilter("ignore")  # the gather fallback's warning is expected here
    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available() and not args.cpu
    backend_name = "nccl" if cuda else "gloo"
    dist.init_process_group(backend_name, init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    from torch.distributed.fsdp import fully_shard

    from stiefel_kernels import StiefelAdamW
    from stiefel_kernels.distributed import stiefel_shard_placement_fn

    _gathered_torch_backend()
    rows = []
    for cfg in args.configs:
        desc, shape, count = CONFIGS[cfg]
        gen = torch.Generator().manual_seed(0)
        model = Factors(shape, count, gen).to(device)
        fn = stiefel_shard_placement_fn([b.A for b in model.blocks], shard_size=world)
        for b in model.blocks:
            fully_shard(b, shard_placement_fn=fn)
        params = [b.A for b in model.blocks]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-2
        numel = sum(p.numel() for p in params)
        local = sum(p.to_local().numel() for p in params)
        r = min(shape)
        backends = ["torch", "torch_gathered"] + (["triton"] if cuda else [])
        if cfg == "small" or args.reference:
            backends.append("reference")
        for name in backends + ["adamw"]:
            snapshot = [p.detach().to_local().clone() for p in params]
            if name == "adamw":
                opt = torch.optim.AdamW(params, lr=1e-3, foreach=True)
            else:
                opt = StiefelAdamW(params, stiefel=True, lr=1e-3, backend=name)
            opt.step()  # state created, first-step checks done
            calls = []
            orig = dist.all_reduce

            def counting(t, *a, **k):
                calls.append(t.numel() * t.element_size())
                return orig(t, *a, **k)

            dist.all_reduce = counting
            try:
                opt.step()
            finally:
                dist.all_reduce = orig
            reduce_bytes = sum(calls)
            ms = _time_steps(opt, device, args.rounds, args.warmup)
            gathered = name in ("torch_gathered", "reference")
            elem = params[0].element_size()
            gather_bytes = 4 * numel * elem * (world - 1) // world if gathered else 0
            words = 7 if name == "adamw" else 10
            mem = (numel if gathered else local) * words * elem
            rows.append(dict(config=cfg, desc=desc, backend=name, ms=ms, reduce_bytes=reduce_bytes,
                             reduce_calls=len(calls), gather_bytes=gather_bytes, mem_bytes=mem,
                             r=r))
            with torch.no_grad():
                for p, s in zip(params, snapshot):
                    p.to_local().copy_(s)
            del opt
    if rank == 0:
        out_q.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def _mb(b):
    return "0" if b == 0 else f"{b / 2**20:.2f} MiB" if b >= 2**16 else f"{b / 2**10:.1f} KiB"


def render(rows, args, world, device_desc):
    label = {"torch": "StiefelAdamW torch (local shards)", "torch_gathered":
             "StiefelAdamW torch, gathered", "triton": "StiefelAdamW triton (local shards)",
             "reference": "StiefelAdamW reference (gathered)", "adamw": "AdamW foreach (scale)"}
    out = [f"# StiefelAdamW.step() under FSDP2, {world} ranks, {device_desc}", "",
           f"torch {torch.__version__}, Python {platform.python_version()}, "
           f"{_dt.datetime.now().isoformat(timespec='seconds')}. Command: `python "
           f"bench/bench_fsdp_step.py {' '.join(sys.argv[1:])}`. Gradients pre-filled, "
           f"{args.warmup} warm-up steps, median of {args.rounds} rounds of the slowest rank, "
           f"{args.threads} intra-op thread(s) per rank, float32.", ""]
    for cfg in dict.fromkeys(r["config"] for r in rows):
        sub = [r for r in rows if r["config"] == cfg]
        base = next(r["ms"] for r in sub if r["backend"] == "adamw")
        out += [f"## {sub[0]['desc']}", "",
                "| step | median ms | x AdamW | all-reduce per step (calls, bytes) | gathered per step | local memory floor |",
                "|---|---|---|---|---|---|"]
        for r in sub:
            out.append(f"| {label[r['backend']]} | {r['ms']:.2f} | {r['ms'] / base:.2f}x | "
                       f"{r['reduce_calls']}, {_mb(r['reduce_bytes'])} | {_mb(r['gather_bytes'])} | "
                       f"{_mb(r['mem_bytes'])} |")
        out.append("")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reference", action="store_true", help="time the reference on every config")
    ap.add_argument("--cpu", action="store_true", help="gloo on the CPU even where CUDA exists")
    ap.add_argument("--out", default=None, help="also write the markdown table there")
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.cpu
    if cuda and args.world > torch.cuda.device_count():
        ap.error(f"--world {args.world} needs as many GPUs ({torch.cuda.device_count()} here)")
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        init = os.path.join(tmp, "init")
        procs = [ctx.Process(target=_worker, args=(r, args.world, init, args, q))
                 for r in range(args.world)]
        for p in procs:
            p.start()
        rows = q.get()
        for p in procs:
            p.join()
    if cuda:
        desc = torch.cuda.get_device_name(0)
    else:
        desc = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, gloo)"
    text = render(rows, args, args.world, desc)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()

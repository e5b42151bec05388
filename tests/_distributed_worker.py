"""One rank of the distributed tests (run by tests/test_distributed.py, gloo on CPU).

    python tests/_distributed_worker.py PHASE RANK WORLD INIT_FILE OUT_DIR CKPT_DIR

Phase "a" (2 ranks): DDP, FSDP2 (fast path, fallbacks, collective count), checkpoint save.
Phase "b" (3 ranks, empty shards): FSDP2, fallback, checkpoint load onto 3 ranks and resume.
Every rank compares with a single-process run of the same model on the same global batch and
writes ``{scenario: "ok" | error}`` to ``OUT_DIR/PHASE_RANK.json``.
"""
from __future__ import annotations

import datetime
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist
from torch import nn

torch.set_num_threads(1)
if not torch.cuda.is_available():  # the triton scenarios run the kernels under the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from stiefel_kernels import StiefelAdamW, orthogonality_error, random_stiefel  # noqa: E402
from stiefel_kernels.distributed import stiefel_shard_placement_fn  # noqa: E402

GLOBAL_BATCH = 12  # divisible by 2 and 3: every rank holds an equal slice
N_IN, N_OUT = 6, 3
REL = 1e-5


class LoRA(nn.Module):
    """tanh(x W0^T + x A^T B^T) with W0 frozen, A a Stiefel factor (r x n wide, or n x r tall)."""

    def __init__(self, n_in: int, n_out: int, r: int, gen: torch.Generator, tall: bool = False):
        super().__init__()
        self.tall = tall
        self.W0 = nn.Parameter(torch.randn(n_out, n_in, generator=gen) / n_in ** 0.5, requires_grad=False)
        self.A = nn.Parameter(random_stiefel(*((n_in, r) if tall else (r, n_in)), generator=gen))
        self.B = nn.Parameter(torch.randn(n_out, r, generator=gen) * 0.5)

    def forward(self, x):
        a = x @ self.A if self.tall else x @ self.A.T
        return torch.tanh(x @ self.W0.T + a @ self.B.T)


class Heads(nn.Module):
    """A stack of h wide Stiefel factors (h, r, n) with their B's (h, n_out, r)."""

    def __init__(self, n_in: int, n_out: int, r: int, h: int, gen: torch.Generator):
        super().__init__()
        self.A = nn.Parameter(random_stiefel(h, r, n_in, generator=gen))
        self.B = nn.Parameter(torch.randn(h, n_out, r, generator=gen) * 0.5)

    def forward(self, x):
        return torch.tanh(torch.einsum("bn,hrn,hor->bo", x, self.A, self.B))


class Net(nn.Module):
    """Stiefel factors and their FSDP2 placements (2 ranks | 3 ranks):
    (2, 6) wide: Shard(1) | Shard(1);  (7, 2) tall: Shard(0) uneven | uneven;
    (2, 2, 6) stack: Shard(2) | Shard(2);  (2, 1, 5) stack, 5 uneven: Shard(0) | Shard(0), one empty;
    (2, 1) tall: Shard(0) | one empty shard;  (1, 3) wide: short dim, gathered | Shard(1)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.blocks = nn.ModuleList([
            LoRA(N_IN, 7, 2, gen), LoRA(7, 6, 2, gen, tall=True), Heads(6, 5, 2, 2, gen),
            Heads(5, 2, 1, 2, gen), LoRA(2, 3, 1, gen, tall=True), LoRA(3, N_OUT, 1, gen)])

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def data(step: int):
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(GLOBAL_BATCH, N_IN, generator=gen), torch.randn(GLOBAL_BATCH, N_OUT, generator=gen)


def make_opt(model: nn.Module, **kw) -> StiefelAdamW:
    named = list(model.named_parameters())
    return StiefelAdamW([
        {"params": [p for n, p in named if n.endswith(".A")], "stiefel": True},
        {"params": [p for n, p in named if not n.endswith(".A") and p.requires_grad]},
    ], lr=2e-2, weight_decay=0.01, **kw)


def train(model, opt, steps, rank=0, world=1, start=0):
    lo, hi = rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world
    for t in range(start, start + steps):
        x, y = data(t)
        opt.zero_grad()
        ((model(x[lo:hi]) - y[lo:hi]) ** 2).mean().backward()
        opt.step()


def single_process(steps, **kw):
    model = Net()
    opt = make_opt(model, **kw)
    train(model, opt, steps)
    return {n: p.detach() for n, p in model.named_parameters()}


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def compare(model, ref, prefix=""):
    for name, p in model.named_parameters():
        got, want = full(p.detach()), ref[name[len(prefix):]]
        rel = float((got - want).norm() / want.norm())
        assert rel < REL, f"{name}: relative error {rel:.2e} vs the single-process run"
        if name.endswith(".A"):
            err = float(orthogonality_error(got).max())
            assert err < 1e-5, f"{name}: ||X^T X - I|| = {err:.2e}"


def fsdp_model(overrides=None, seed=0):
    """Net under FSDP2, Stiefel factors on their long dim; ``overrides``: block index -> placement."""
    from torch.distributed.fsdp import fully_shard

    model = Net(seed)
    long_side = stiefel_shard_placement_fn([b.A for b in model.blocks])
    special = {id(model.blocks[i].A): pl for i, pl in (overrides or {}).items()}

    def fn(p):
        return special.get(id(p)) or long_side(p)

    for b in model.blocks:
        fully_shard(b, shard_placement_fn=fn)
    fully_shard(model, shard_placement_fn=fn)
    return model


STEPS = 6


def scenario_ddp(rank, world, ckpt):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = Net()
    ddp = DDP(model)
    opt = make_opt(model)
    train(ddp, opt, STEPS, rank, world)
    for p in model.parameters():  # identical on every rank, bit for bit
        p0 = p.detach().clone()
        dist.broadcast(p0, 0)
        assert torch.equal(p0, p.detach()), "DDP ranks diverged"
    compare(model, single_process(STEPS))


def scenario_fsdp(rank, world, ckpt, **kw):
    from torch.distributed.tensor import DTensor, Shard

    model = fsdp_model()
    expect = [Shard(1), Shard(0), Shard(2), Shard(0), Shard(0), Shard(0) if world == 2 else Shard(1)]
    for b, pl in zip(model.blocks, expect):
        assert isinstance(b.A, DTensor) and b.A.placements == (pl,), (b.A.shape, b.A.placements)
    opt = make_opt(model, **kw)
    train(model, opt, STEPS, rank, world)
    compare(model, single_process(STEPS, **kw))
    err = opt.orthogonality_error()  # telemetry of the factors this rank stepped
    assert err is not None and err.dim() == 0 and float(err) < 1e-4


def scenario_fsdp_qr_amsgrad(rank, world, ckpt):
    scenario_fsdp(rank, world, ckpt, retraction="qr", amsgrad=True)


def scenario_fsdp_reference(rank, world, ckpt):
    scenario_fsdp(rank, world, ckpt, backend="reference")


def scenario_fsdp_triton(rank, world, ckpt):
    """The triton backend on local shards (uneven ones, and with 3 ranks an empty one): equal to
    one process within the fp32 policy, one all-reduce per bucket sharded along its long side,
    and every rank's small step gets bit-identical (K, G, H) for those buckets."""
    from stiefel_kernels.backends import triton_backend

    seen, current = [], {}
    orig_core, orig_small = triton_backend._group_step_core, triton_backend.small_step

    def core(*args, sharding=None, **kw):
        current["reduced"] = sharding is not None and bool(sharding.reduce_dims)
        return orig_core(*args, sharding=sharding, **kw)

    def small_step(grams, hp, r_pad):
        if current["reduced"]:
            seen.append(grams.detach().clone())
        return orig_small(grams, hp, r_pad)

    triton_backend._group_step_core, triton_backend.small_step = core, small_step
    try:
        scenario_fsdp(rank, world, ckpt, backend="triton")
    finally:
        triton_backend._group_step_core, triton_backend.small_step = orig_core, orig_small
    # buckets reduced over the ranks: (2, 6) Shard(1), (7, 2) Shard(0) uneven, (2, 2, 6) Shard(2),
    # (2, 1) Shard(0) (empty on one of 3 ranks), and with 3 ranks (1, 3) Shard(1); the stack
    # (2, 1, 5) is sharded over its stack dim (local, nothing to reduce), and with 2 ranks
    # (1, 3) lies on its short dim (gathered)
    buckets = 4 if world == 2 else 5
    assert len(seen) == STEPS * buckets, (len(seen), [tuple(t.shape) for t in seen])
    mine = [t.tolist() for t in seen]
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    assert all(other == mine for other in gathered), "small-step inputs differ between ranks"


def scenario_fsdp_master_bf16(rank, world, ckpt):
    """bf16 factors with ``master_weights=True`` under FSDP2, given the same gradients as one
    process (set directly: a bf16 backward's own rounding differs between a sharded and a
    whole batch): the float32 master copies are DTensors sharded like their factors, equal to
    one process's within the fp32 policy, orthonormal to 1e-5; each factor holds its master's
    bf16 rounding."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, distribute_tensor

    from stiefel_kernels.distributed import orthogonality_error as ortho

    def factors(model):
        return [(n, p) for n, p in model.named_parameters() if n.endswith(".A")]

    def run(model, opt):
        for t in range(STEPS):
            gen = torch.Generator().manual_seed(500 + t)
            for _, p in factors(model):
                g = torch.randn(p.shape, generator=gen).to(torch.bfloat16)
                if isinstance(p, DTensor):
                    g = distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None)
                p.grad = g
            opt.step()

    ref_model = Net().to(torch.bfloat16)
    ref_opt = StiefelAdamW([p for _, p in factors(ref_model)], stiefel=True, lr=2e-2,
                           master_weights=True)
    run(ref_model, ref_opt)

    model = Net().to(torch.bfloat16)
    long_side = stiefel_shard_placement_fn([b.A for b in model.blocks])
    for b in model.blocks:
        fully_shard(b, shard_placement_fn=long_side)
    fully_shard(model, shard_placement_fn=long_side)
    opt = StiefelAdamW([p for _, p in factors(model)], stiefel=True, lr=2e-2, master_weights=True)
    run(model, opt)
    ref_params = dict(factors(ref_model))
    for name, p in factors(model):
        master = opt.state[p]["master"]
        assert isinstance(master, DTensor) and master.placements == p.placements, name
        want = ref_opt.state[ref_params[name]]["master"]
        got = master.full_tensor()
        assert got.dtype == torch.float32
        rel = float((got - want).norm() / want.norm())
        assert rel < REL, f"{name}: master relative error {rel:.2e} vs one process"
        assert float(ortho(master).max()) < 1e-5, name
        assert torch.equal(p.full_tensor(), got.to(torch.bfloat16)), name


def scenario_fallback_short_dim(rank, world, ckpt):
    from torch.distributed.tensor import Shard

    import warnings

    from stiefel_kernels import distributed as skd

    model = fsdp_model({0: Shard(0)})  # (2, 6) on its short dim (3 ranks: one shard empty)
    assert model.blocks[0].A.placements == (Shard(0),)
    opt = make_opt(model)
    skd._GATHER_WARNED.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(model, opt, STEPS, rank, world)
    gathers = [str(w.message) for w in caught if "gathers it" in str(w.message)]
    # once per gathered layout, not once per step: (2, 6) and, with 2 ranks, (1, 3) too
    assert len(gathers) == (2 if world == 2 else 1), gathers
    assert "(2, 6)" in gathers[0] and "not sharded along its long side" in gathers[0], gathers
    compare(model, single_process(STEPS))


def scenario_one_all_reduce_per_bucket(rank, world, ckpt):
    model = fsdp_model()
    opt = make_opt(model)
    train(model, opt, 1, rank, world)  # first step: orthogonality check (one Gram per factor)
    calls = []
    orig = dist.all_reduce

    def counting(t, *a, **k):
        calls.append(tuple(t.shape))
        return orig(t, *a, **k)

    dist.all_reduce = counting
    try:
        train(model, opt, 2, rank, world, start=1)
    finally:
        dist.all_reduce = orig
    # per step one stacked (K, G, H) per bucket sharded on its long dim; nothing else (the stack
    # sharded on its stack dim needs none, the (1, 3) factor sharded on its short dim is gathered)
    assert sorted(calls) == sorted([(3, 1, 2, 2), (3, 1, 2, 2), (3, 1, 2, 2, 2), (3, 1, 1, 1)] * 2), calls


def scenario_partial_raises(rank, world, ckpt):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial

    mesh = init_device_mesh("cpu", (world,))
    a = nn.Parameter(DTensor.from_local(random_stiefel(2, 6) / world, mesh, [Partial()]))
    a.grad = DTensor.from_local(torch.ones(2, 6), mesh, [Partial()])
    opt = StiefelAdamW([a], stiefel=True)
    try:
        opt.step()
    except ValueError as exc:
        assert "Partial" in str(exc), exc
    else:
        raise AssertionError("a Partial Stiefel factor was stepped")


CKPT_STEPS = 4


def scenario_checkpoint_save(rank, world, ckpt):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = fsdp_model()
    opt = make_opt(model)
    train(model, opt, CKPT_STEPS, rank, world)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=ckpt)
    compare(model, single_process(CKPT_STEPS))


def scenario_checkpoint_resume(rank, world, ckpt):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = fsdp_model(seed=123)  # other values: everything must come from the checkpoint
    opt = make_opt(model)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=ckpt)
    set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd)
    assert all(float(s["step"]) == CKPT_STEPS for s in opt.state.values())
    train(model, opt, CKPT_STEPS, rank, world, start=CKPT_STEPS)
    compare(model, single_process(2 * CKPT_STEPS))  # resume == uninterrupted


PHASES = {
    "a": [scenario_ddp, scenario_fsdp, scenario_fsdp_qr_amsgrad, scenario_fsdp_reference,
          scenario_fsdp_triton, scenario_fsdp_master_bf16, scenario_fallback_short_dim, scenario_one_all_reduce_per_bucket, scenario_partial_raises,
          scenario_checkpoint_save],
    "b": [scenario_fsdp, scenario_fsdp_triton, scenario_fsdp_master_bf16, scenario_fallback_short_dim,
          scenario_checkpoint_resume],
}


def main():
    phase, rank, world, init_file, out_dir, ckpt = sys.argv[1:7]
    rank, world = int(rank), int(world)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    results = {}
    for fn in PHASES[phase]:
        name = fn.__name__[len("scenario_"):]
        try:
            fn(rank, world, ckpt)
            results[name] = "ok"
        except Exception:  # recorded; the other ranks go on (comparisons follow the collectives)
            results[name] = traceback.format_exc()
        dist.barrier()
        with open(os.path.join(out_dir, f"{phase}_{rank}.json"), "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""DDP and FSDP2 on CPU with gloo: 2 and 3 processes against a single-process run.

The ranks run ``tests/_distributed_worker.py`` (one launch of 2 ranks, then one of 3 that loads
the 2-rank checkpoint); each scenario there compares with the same model trained in one process
on the same global batch (relative error < 1e-5, float32) and checks orthogonality.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from stiefel_kernels.distributed import is_dtensor, long_dim, stiefel_shard_placement_fn

pytestmark = [pytest.mark.distributed,
              pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")]

WORKER = os.path.join(os.path.dirname(__file__), "_distributed_worker.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(phase, world, tmp, ckpt):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    init = os.path.join(tmp, f"init_{phase}")
    procs = [subprocess.Popen([sys.executable, WORKER, phase, str(r), str(world), init, tmp, ckpt],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            logs.append(p.communicate()[0] + "\n<timed out>")
    results = []
    for r in range(world):
        path = os.path.join(tmp, f"{phase}_{r}.json")
        results.append(json.load(open(path)) if os.path.exists(path) else {})
    return results, "\n".join(f"--- rank {r} (rc {p.returncode}):\n{log[-3000:]}"
                              for r, (p, log) in enumerate(zip(procs, logs)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both launches (~35 s on 2 cores): every test that uses it is marked ``slow``."""
    tmp = str(tmp_path_factory.mktemp("dist"))
    ckpt = os.path.join(tmp, "ckpt")
    return {"a": _launch("a", 2, tmp, ckpt), "b": _launch("b", 3, tmp, ckpt)}


def _check(runs, phase, scenario):
    results, logs = runs[phase]
    for r, res in enumerate(results):
        assert res.get(scenario) == "ok", f"rank {r}: {res.get(scenario, 'did not run')}\n{logs}"


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["ddp"])
def test_ddp_same_on_all_ranks_and_equal_to_one_process(runs, scenario):
    _check(runs, "a", scenario)


@pytest.mark.slow
@pytest.mark.parametrize("phase, scenario", [
    ("a", "fsdp"), ("a", "fsdp_qr_amsgrad"), ("a", "fsdp_reference"),
    ("b", "fsdp"),  # 3 ranks: uneven and empty shards
])
def test_fsdp2_long_dim_sharding_equals_one_process(runs, phase, scenario):
    _check(runs, phase, scenario)


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["a", "b"])  # 2 ranks (uneven shard), 3 ranks (and an empty one)
def test_fsdp2_triton_backend_steps_local_shards(runs, phase):
    _check(runs, phase, "fsdp_triton")


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["a", "b"])
def test_fsdp2_bf16_factors_with_master_weights_equal_one_process(runs, phase):
    _check(runs, phase, "fsdp_master_bf16")


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["a", "b"])
def test_fsdp2_other_layout_falls_back_to_gather(runs, phase):
    _check(runs, phase, "fallback_short_dim")


@pytest.mark.slow
def test_one_all_reduce_per_bucket(runs):
    _check(runs, "a", "one_all_reduce_per_bucket")


@pytest.mark.slow
def test_partial_factor_raises(runs):
    _check(runs, "a", "partial_raises")


@pytest.mark.slow
def test_checkpoint_2_ranks_to_3_resumes_trajectory(runs):
    _check(runs, "a", "checkpoint_save")
    _check(runs, "b", "checkpoint_resume")


def test_placement_fn_long_dim():
    from torch.distributed.tensor import Shard

    wide, tall, square, stack, odd, odd_stack, other = (
        torch.zeros(2, 8), torch.zeros(8, 2), torch.zeros(3, 3), torch.zeros(4, 2, 8),
        torch.zeros(2, 7), torch.zeros(4, 2, 7), torch.zeros(5, 5))
    fn = stiefel_shard_placement_fn([wide, tall, square, stack, odd, odd_stack], shard_size=2)
    assert [long_dim(t) for t in (wide, tall, square, stack)] == [1, 0, 0, 2]
    assert fn(wide) == Shard(1) and fn(tall) == Shard(0) and fn(square) == Shard(0)
    assert fn(stack) == Shard(2)
    assert fn(odd_stack) == Shard(0)  # FSDP2 shards dims > 0 evenly only: whole factors per rank
    with pytest.warns(UserWarning, match="gathers"):
        assert fn(odd) is None  # FSDP2's default Shard(0): the short dim, gathered by the step
    assert fn(other) is None
    assert stiefel_shard_placement_fn(lambda p: p.dim() == 2, default=lambda p: Shard(0),
                                      shard_size=4)(wide) == Shard(1)
    assert not is_dtensor(wide)

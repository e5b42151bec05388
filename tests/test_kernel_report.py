"""The kernel report (``bench/kernel_report.py``) as a test, and the launch decisions it rests on.

* every kernel in every configuration the launchers can ask for (ranks ``1..MAX_RANK``, fp32 and
  bf16 parameters and gradients, AMSGrad on and off, maximize, both orientations, each dot
  precision, aligned and unaligned buckets) compiles ahead of time for sm_90 with 0 spill bytes
  and shared memory under the H100 per-block limit; the aligned kernels move data in 16-byte
  accesses. Compiled in a subprocess without ``TRITON_INTERPRET`` (no GPU needed); each distinct
  specialization once, two at a time; Triton's cache and a ptxas-result cache make reruns fast.
* ``launch_config`` fills the GPU for GPT-2's QK factors (SM count injected, no CUDA needed);
* an unaligned bucket takes the unaligned kernel and steps like the reference backend
  (interpreter).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from stiefel_kernels.backends import StiefelHyperparams, get_backend, resolve_backend, state_dtype  # noqa: E402
from stiefel_kernels.backends import triton_backend as tb  # noqa: E402
from stiefel_kernels.geometry import random_stiefel  # noqa: E402
from stiefel_kernels.kernels import launch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
H100_MAX_SHARED = 232448


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "kernel_report.py"), "--check",
                          "--jobs", "2", "--json", str(out)],
                         capture_output=True, text=True, env=env, timeout=900)
    if res.returncode != 0 and "ptxas" in res.stderr and "not found" in res.stderr.lower():
        pytest.skip("no ptxas in this triton install")
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.slow  # the report's ~150 compiles: ~90 s cold, ~5 s with Triton's cache
def test_every_config_compiles_without_spills_within_shared_memory(report):
    rows = report["rows"]
    assert report["meta"]["max_rank"] == tb.MAX_RANK
    assert report["meta"]["small_max_rank"] == launch.SMALL_STEP_MAX_RANK
    for row in rows:
        where = (row["kernel"], row["config"])
        assert row["spill_st"] == 0 and row["spill_ld"] == 0, where
        assert 0 < row["regs"] <= 255, where
        assert row["shared"] <= H100_MAX_SHARED, where
    # the enumeration reached every tile size, both dot precisions, both orientations, both
    # alignments, and both AMSGrad settings / maximize share one compile
    r_pads = {16 << i for i in range((tb.MAX_RANK // 16).bit_length())}
    for kernel in ("stiefel_pass1_kernel", "stiefel_pass2_kernel"):
        mine = [row for row in rows if row["kernel"] == kernel]
        assert {row["R_PAD"] for row in mine} == r_pads
        for part in ("ieee", "tf32x3", "tall", "wide", "A0"):
            assert any(part in row["config"].split() for row in mine), (kernel, part)
        assert all(row["amsgrad"] == [False, True] for row in mine), kernel
    assert all(row["maximize"] == [False, True] for row in rows
               if row["kernel"] == "stiefel_pass1_kernel")
    small = {row["R_PAD"] for row in rows if row["kernel"] == "small_step_kernel"}
    assert small == {r for r in r_pads if r <= max(16, launch.next_pow2(launch.SMALL_STEP_MAX_RANK))}


@pytest.mark.slow  # the report's ~150 compiles: ~90 s cold, ~5 s with Triton's cache
def test_aligned_buckets_use_wider_accesses(report):
    """Each aligned kernel (``ALIGNED > 0``) has more vector loads (v4 / v2, 16- / 8-byte
    ``cp.async``) than its unaligned twin and no fewer vector stores; 16-byte loads and stores
    appear in both passes. (How wide a tile's accesses can be also depends on how many
    contiguous elements a thread holds: BLOCK_N x R_PAD over the threads.)"""
    rows = {(row["kernel"], row["config"]): row for row in report["rows"]}

    def vec_loads(row):
        return row["ld"]["v4"] + row["ld"]["v2"] + row["cp"]["16"] + row["cp"]["8"]

    def vec_stores(row):
        return row["st"]["v4"] + row["st"]["v2"]

    wide16 = set()
    for (kernel, config), row in rows.items():
        if kernel == "small_step_kernel" or not row["ALIGNED"]:
            continue
        twin = rows[(kernel, config.rsplit(" ", 1)[0] + " A0")]
        assert vec_loads(row) > vec_loads(twin), (kernel, config, row["ld"], row["cp"])
        assert vec_stores(row) >= vec_stores(twin), (kernel, config, row["st"])
        if row["ld"]["v4"] + row["cp"]["16"] > 0 and row["st"]["v4"] > 0:
            wide16.add(kernel)
    assert wide16 == {"stiefel_pass1_kernel", "stiefel_pass2_kernel"}


# ----------------------------------------------------------------------------- launch decisions
def test_launch_config_fills_the_gpu_for_gpt2_qk():
    """144 factors of 768 x 64 on 132 SMs: at least two waves' worth of programs."""
    for dot in ("ieee", "tf32x3"):
        cfg = launch.launch_config(768, 64, 144, torch.device("cpu"), sm_count=132,
                                   dot_precision=dot)
        assert 144 * cfg["num_chunks"] >= 2 * 132, cfg
        assert cfg["rows_per_chunk"] * cfg["num_chunks"] >= 768
        assert cfg["rows_per_chunk"] * (cfg["num_chunks"] - 1) < 768
        assert cfg["rows_per_chunk"] % cfg["BLOCK_N"] == 0
    # many factors keep the long chunks (few partial sums): LoRA r = 16 on 64 factors of 4096
    cfg = launch.launch_config(4096, 16, 64, torch.device("cpu"), sm_count=132)
    assert cfg["rows_per_chunk"] >= 16 * cfg["R_PAD"] and 64 * cfg["num_chunks"] >= 2 * 132
    # without an SM count off CUDA (the interpreter): one chunk unless the maximum forces more
    assert launch.launch_config(768, 64, 144, torch.device("cpu"))["num_chunks"] == 1


def test_alignment_picks_the_kernel():
    hp = StiefelHyperparams(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, amsgrad=False,
                            maximize=False, retraction="qr", cayley_iters=2, ns_steps=6,
                            drift_tol=1e-6)
    bc = torch.ones(2, 1)
    part = torch.empty(16)

    def aligned(shape, ptr_aligned, p=torch.float32, g=torch.float32):
        n, r, _, _ = launch.orientation(shape)
        cfg = launch.launch_config(n, r, 1, torch.device("cpu"))
        ptrs = torch.zeros(5, 1, dtype=torch.int64)
        return launch.pass1_launch(ptrs, shape, p, g, bc, hp, cfg, 1, part,
                                   aligned=ptr_aligned)[2]["ALIGNED"]

    assert aligned((64, 12), True) == 4          # tall, rows of 12 fp32: 48 bytes
    assert aligned((64, 12), True, torch.bfloat16) == 0  # 24-byte bf16 rows
    assert aligned((16, 4096), True, torch.bfloat16) == 8
    assert aligned((37, 3), True) == 0           # 12-byte rows
    assert aligned((64, 12), False) == 0
    big = torch.empty(2 * 12 * 64 + 1)
    odd = [big[1:1 + 768].view(64, 12), big[1 + 768:1 + 1536].view(64, 12)]
    assert all(t.is_contiguous() for t in odd)
    assert not launch.pointers_aligned(launch.pointer_array([odd, odd, odd, odd, None],
                                                            torch.device("cpu")))
    even = [torch.empty(64, 12) for _ in range(2)]
    assert launch.pointers_aligned(launch.pointer_array([even, even, even, even, None],
                                                        torch.device("cpu")))


@pytest.mark.parametrize("shape,dtype", [((64, 12), torch.float32), ((12, 64), torch.float32),
                                         ((12, 64), torch.bfloat16)], ids=["tall", "wide", "bf16"])
def test_unaligned_bucket_steps_like_the_reference(gen, shape, dtype):
    """Factors at a 4-byte (2-byte for bf16) offset into a larger buffer: contiguous matrices,
    not 16-byte aligned, so the bucket takes the ``ALIGNED = 0`` kernels."""
    hp = StiefelHyperparams(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, amsgrad=True,
                            maximize=False, retraction="cayley_fp", cayley_iters=2, ns_steps=6,
                            drift_tol=1e-6)
    numel = shape[0] * shape[1]
    big = torch.zeros(2 * numel + 1, dtype=dtype, device=DEVICE)
    ps = [big[1 + i * numel:1 + (i + 1) * numel].view(shape) for i in range(2)]
    for p in ps:
        p.copy_(random_stiefel(*shape, generator=gen).to(dtype))
        assert p.is_contiguous() and p.data_ptr() % 16 != 0
    qs = [p.clone() for p in ps]

    def states(params):
        def z():
            return [torch.zeros(p.shape, dtype=state_dtype(p), device=p.device) for p in params]
        return z(), z(), z(), [torch.tensor(0.0) for _ in params]

    st_t, st_r = states(ps), states(qs)
    triton, ref = get_backend("triton"), get_backend("reference")
    for _ in range(3):
        gs = [torch.randn(shape, generator=gen).to(dtype=dtype, device=DEVICE) for _ in ps]
        triton.step(ps, gs, *st_t, hp)
        ref.step(qs, gs, *st_r, hp)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for p, q in zip(ps, qs):
        err = float((p.double() - q.double()).norm() / q.double().norm())
        assert err < tol, err


def test_rank_above_max_rank_is_refused_with_a_reason():
    p = torch.empty(tb.MAX_RANK + 1, 300, device=DEVICE)
    reason = tb.unsupported_reason(p)
    assert reason is not None and str(tb.MAX_RANK) in reason and "torch" in reason
    with pytest.raises(ValueError, match="cannot step this parameter"):
        resolve_backend("triton", p)
    assert resolve_backend("auto", p).name != "triton"  # auto falls back, never raises

"""pretrain_gpt.py and finetune_lora.py run end to end in smoke mode (a few steps, tiny model)."""
import pytest
import torch

from _recipes import GPT, GPTConfig, load
from stiefel_kernels import nn as sk_nn
from stiefel_kernels.nn import FactorizedCausalSelfAttention, param_groups, stiefel_parameters


def test_pretrain_then_finetune_smoke(tmp_path, capsys):
    n = torch.get_num_threads()
    try:
        pre = load("pretrain_gpt")
        assert pre.main(["--smoke", "--out-dir", str(tmp_path / "pre")]) == 0
        out = capsys.readouterr().out
        assert "| AdamW " in out and "| Stiefel-AdamW " in out
        ck = tmp_path / "pre" / "gpt_stiefel-adamw.pt"
        assert ck.exists() and (tmp_path / "pre" / "gpt_adamw.pt").exists()
        assert (tmp_path / "pre" / "pretrain_gpt.png").stat().st_size > 1000
        row = [l for l in out.splitlines() if l.startswith("| Stiefel-AdamW ")][0]
        assert float(row.split("|")[-2]) < 1e-4  # W_Q stays orthonormal
        logged = [l for l in out.splitlines() if "logged by opt.orthogonality_error()" in l]
        assert len(logged) == 1 and float(logged[0].split()[-1]) < 1e-4  # the telemetry, logged

        ft = load("finetune_lora")
        assert ft.main(["--smoke", "--init-from", str(ck), "--out-dir", str(tmp_path / "ft")]) == 0
        out = capsys.readouterr().out
        for label in ("LoRA + AdamW", "LoRA + Stiefel-AdamW", "StelLA"):
            assert f"| {label}" in out
        assert (tmp_path / "ft" / "finetune_lora.png").exists()
    finally:
        torch.set_num_threads(n)


def test_finetune_pretrains_when_checkpoint_missing(tmp_path, capsys):
    n = torch.get_num_threads()
    try:
        ft = load("finetune_lora")
        ck = tmp_path / "base" / "tiny.pt"
        assert ft.main(["--smoke", "--init-from", str(ck), "--methods", "stella", "--no-plot"]) == 0
        assert ck.exists() and "not found: pre-training" in capsys.readouterr().out
    finally:
        torch.set_num_threads(n)


def test_recipe_gpt_uses_the_library_attention():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, block_size=8, n_layer=2, n_head=2, d_model=16))
    attn = [m for m in model.modules() if isinstance(m, FactorizedCausalSelfAttention)]
    assert len(attn) == 2 and stiefel_parameters(model) == [m.w_q for m in attn]
    groups = param_groups(model, weight_decay=0.1)
    assert groups[0] == {"params": [m.w_q for m in attn], "stiefel": True}
    assert [g["weight_decay"] for g in groups[1:]] == [0.1, 0.0]
    logits, loss = model(torch.randint(0, 32, (2, 8)), torch.randint(0, 32, (2, 8)))
    assert logits.shape == (2, 8, 32) and loss.ndim == 0
    assert not hasattr(sk_nn, "GPT") and not hasattr(sk_nn, "GPTConfig")  # recipe models now


@pytest.mark.distributed
def test_pretrain_with_fsdp2_on_two_gloo_processes(tmp_path):
    """``python/pretrain_gpt.py --fsdp`` as torchrun starts it (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR/PORT; launched here directly, without torchrun's agent): FSDP2 on the CPU, W_Q
    sharded on its long side, a few steps of both optimizers; both processes exit 0;
    rank 0 prints the table and saves full (gathered) checkpoints that load into the unsharded
    model."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen(
            [sys.executable, str(root / "python" / "pretrain_gpt.py"), "--smoke", "--fsdp",
             "--no-plot", "--out-dir", str(tmp_path)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env))
    outs = []
    for proc in procs:
        try:
            outs.append(proc.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    out, other = outs
    assert "FSDP2 over 2 ranks" in out and "FSDP2 x 2" in out
    assert "| Stiefel-AdamW " not in other  # rank 0 only
    row = [l for l in out.splitlines() if l.startswith("| Stiefel-AdamW ")][0]
    assert float(row.split("|")[-2]) < 1e-4  # W_Q orthonormal across the shards
    ck = torch.load(tmp_path / "gpt_stiefel-adamw.pt", weights_only=False)
    model = GPT(GPTConfig(**ck["config"]))
    model.load_state_dict(ck["model"])  # plain, full tensors

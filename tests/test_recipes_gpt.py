"""pretrain_gpt.py and finetune_lora.py run end to end in smoke mode (a few steps, tiny model)."""
import importlib.util
import pathlib
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load(name):
    sys.path.insert(0, str(ROOT / "python"))
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "python" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(ROOT / "python"))


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

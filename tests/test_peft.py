"""Hugging Face PEFT integration on a tiny randomly initialized GPT-2 (built from a config)."""
import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from stiefel_kernels import StiefelAdamW, orthogonality_error  # noqa: E402
from stiefel_kernels.integrations.peft import create_stiefel_adamw, lora_pairs  # noqa: E402
from stiefel_kernels.nn import inject_stella, make_stella_optimizer  # noqa: E402


def _model(seed=0, init_lora_weights=True):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
    base = transformers.GPT2LMHeadModel(cfg)
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], lora_dropout=0.0,
                           fan_in_fan_out=True, init_lora_weights=init_lora_weights)
    return peft.get_peft_model(base, lcfg)


def _products(model):
    return {a_name: (b @ a).detach().clone() for a_name, a, _, b in lora_pairs(model)}


@pytest.mark.parametrize("nonzero_b", [False, True])
def test_factory_keeps_product_and_trains(gen, nonzero_b):
    model = _model(init_lora_weights=not nonzero_b)  # init_lora_weights=False: B random, not 0
    pairs = lora_pairs(model)
    assert len(pairs) == 2
    if nonzero_b:
        assert all(float(b.detach().abs().max()) > 0 for *_, b in pairs)
    before = _products(model)
    ids = torch.randint(0, 64, (2, 16), generator=gen)
    model.eval()
    with torch.no_grad():
        logits0 = model(input_ids=ids).logits
    opt = create_stiefel_adamw(model, lr=1e-2, weight_decay=0.01)
    assert isinstance(opt, StiefelAdamW)
    assert opt.param_groups[0]["stiefel"] and len(opt.param_groups[0]["params"]) == 2
    after = _products(model)
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, logits0, rtol=1e-4, atol=1e-5)
    for _, a, _, _ in pairs:
        assert float(orthogonality_error(a)) < 1e-5
    model.train()
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        losses.append(loss.item())
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0]
    for _, a, _, b in pairs:
        assert float(orthogonality_error(a)) < 1e-5
    assert any(not torch.allclose((b @ a).detach(), before[n]) for n, a, _, b in pairs)


def test_trainer_accepts_optimizer(tmp_path, gen):
    model = _model()
    opt = create_stiefel_adamw(model, lr=5e-3)
    sched = transformers.get_linear_schedule_with_warmup(opt, 1, 4)
    ids = torch.randint(0, 64, (8, 16), generator=gen)
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                                          report_to=[], logging_steps=1, save_strategy="no", use_cpu=True,
                                          disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, sched))
    trainer.train()
    assert trainer.state.global_step == 3
    for _, a, _, _ in lora_pairs(model):
        assert float(orthogonality_error(a)) < 1e-5


def test_stella_on_hf_conv1d(gen):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
    model = transformers.GPT2LMHeadModel(cfg)
    mods = inject_stella(model, ["c_attn", "c_proj"], r=4, alpha=4.0)  # GPT-2's Conv1D layers
    assert len(mods) == 3 and mods[0].in_features == 32 and mods[0].out_features == 96
    ids = torch.randint(0, 64, (2, 16), generator=gen)
    opt, hooks = make_stella_optimizer(model, lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    for m in mods:
        assert float(orthogonality_error(m.U)) < 1e-5 and float(orthogonality_error(m.V)) < 1e-5
    model.eval()
    with torch.no_grad():
        y = model(input_ids=ids).logits
        for m in mods:
            m.merge()
        torch.testing.assert_close(model(input_ids=ids).logits, y, rtol=1e-4, atol=1e-4)

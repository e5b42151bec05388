"""LoRA fine-tuning of the pre-trained GPT on a shifted task: AdamW vs Stiefel-AdamW vs StelLA.

Base model: a checkpoint of ``pretrain_gpt.py`` (the GPT of ``_gpt.py``, trained on
standard-library *source code*); if the file is missing, a tiny one is pre-trained first (about
10 s). Task: the English help texts of ``pydoc_data.topics`` (prose about the language), nothing
downloaded. The base model is frozen; adapters go on the attention value/output projections and
both MLP linears.

Methods (same rank, same learning rate, same batches):

* ``lora-adamw``: LoRA ``W0 + (alpha/r) B A`` (``A`` random, ``B = 0``), AdamW on ``A``, ``B``.
* ``lora-stiefel-adamw``: the same LoRA with ``A`` made row-orthonormal at the start (``B = 0``,
  so the model is unchanged), ``A`` on the Stiefel manifold, ``B`` AdamW (``StiefelAdamW``).
* ``stella``: StelLA ``W0 + (alpha/r) U S V^T`` (``stiefel_kernels.nn.inject_stella``; random
  orthonormal ``U``, ``V``, ``S = I``: a non-zero initialization, as in the paper) trained by
  ``torch.optim.AdamW`` made Riemannian with ``make_riemannian`` hooks (gradient scaling on).

Run:   python python/finetune_lora.py                           (CPU, about a minute)
       python python/finetune_lora.py --init-from out/pretrain_gpt/gpt_adamw.pt --device cuda --steps 1000
       python python/finetune_lora.py --smoke                   (seconds)
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _data  # noqa: E402
import pretrain_gpt as pt  # noqa: E402
from _gpt import GPT, GPTConfig  # noqa: E402

from stiefel_kernels import StiefelAdamW, orthonormalize_  # noqa: E402
from stiefel_kernels.geometry import orthogonality_error  # noqa: E402
from stiefel_kernels.nn import inject_stella, make_stella_optimizer  # noqa: E402

METHODS = ("lora-adamw", "lora-stiefel-adamw", "stella")
LABELS = {"lora-adamw": "LoRA + AdamW", "lora-stiefel-adamw": "LoRA + Stiefel-AdamW", "stella": "StelLA (AdamW+hooks)"}
TARGETS = ("v_proj", "out_proj", "fc", "proj")


class LoRALinear(nn.Module):
    """``y = W0 x + b + (alpha/r) B A x``: ``A`` (``r x in``) Kaiming-uniform like PEFT, ``B = 0``."""

    def __init__(self, base: nn.Linear, r: int, alpha: float) -> None:
        super().__init__()
        self.base, self.scaling = base, alpha / r
        for p in base.parameters():
            p.requires_grad_(False)
        self.A = nn.Parameter(torch.empty(r, base.in_features, dtype=base.weight.dtype, device=base.weight.device))
        self.B = nn.Parameter(torch.zeros(base.out_features, r, dtype=base.weight.dtype, device=base.weight.device))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def forward(self, x):
        return self.base(x) + self.scaling * (x @ self.A.mT) @ self.B.mT


def inject_lora(model: nn.Module, targets, r: int, alpha: float) -> list[LoRALinear]:
    for p in model.parameters():
        p.requires_grad_(False)
    found = [(n, m) for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and any(n == t or n.endswith("." + t) for t in targets)]
    out = []
    for n, m in found:
        parent, _, attr = n.rpartition(".")
        new = LoRALinear(m, r, alpha)
        setattr(model.get_submodule(parent) if parent else model, attr, new)
        out.append(new)
    return out


def load_base(path: str, device) -> GPT:
    ck = torch.load(path, map_location="cpu", weights_only=True)
    model = GPT(GPTConfig(**ck["config"]))
    model.load_state_dict(ck["model"])
    return model.to(device)


def setup(method: str, base: GPT, args):
    """``(model, optimizer, hooks_or_None, stiefel_factors)`` for one method."""
    model = copy.deepcopy(base)
    torch.manual_seed(args.seed + 7)  # the same adapter initialization draw for every method
    if method == "stella":
        mods = inject_stella(model, args.targets, r=args.rank, alpha=args.stella_alpha)
        opt, hooks = make_stella_optimizer(model, torch.optim.AdamW, lr=args.lr, betas=(0.9, 0.999),
                                           weight_decay=args.weight_decay)
        return model, opt, hooks, [p for m in mods for p in (m.U, m.V)]
    mods = inject_lora(model, args.targets, args.rank, args.lora_alpha)
    a_s, b_s = [m.A for m in mods], [m.B for m in mods]
    if method == "lora-adamw":
        opt = torch.optim.AdamW([{"params": a_s + b_s}], lr=args.lr, weight_decay=args.weight_decay)
        return model, opt, None, []
    with torch.no_grad():
        for a, b in zip(a_s, b_s):
            r = orthonormalize_(a)          # A_old = R^T A_new: keep B A
            b.copy_(b @ r.mT)
    opt = StiefelAdamW([{"params": a_s, "stiefel": True}, {"params": b_s}], lr=args.lr,
                       weight_decay=args.weight_decay, retraction=args.retraction)
    return model, opt, None, a_s


def finetune(method: str, base: GPT, train_data, val_data, args, device) -> dict:
    model, opt, hooks, factors = setup(method, base, args)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, pt.lr_lambda(args.warmup, args.steps))
    trainable = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(args.seed + 1)
    hist = {"step": [], "train": [], "val_step": [0], "iter_s": [], "opt_s": [], "params": n_train}
    hist["val"] = [pt.estimate_loss(model, val_data, args, device, args.seed + 2)]
    for step in pt.progress(range(args.steps), LABELS[method], args.steps):
        if args.eval_every and step % args.eval_every == 0 and step > 0:
            hist["val_step"].append(step)
            hist["val"].append(pt.estimate_loss(model, val_data, args, device, args.seed + 2))
        x, y = _data.get_batch(train_data, args.batch_size, args.block_size, g, device)
        pt.sync(device)
        t0 = time.perf_counter()
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip)
        pt.sync(device)
        t1 = time.perf_counter()
        opt.step()
        pt.sync(device)
        t2 = time.perf_counter()
        sched.step()
        hist["step"].append(step)
        hist["train"].append(loss.item())
        hist["iter_s"].append(t2 - t0)
        hist["opt_s"].append(t2 - t1)
    hist["val_step"].append(args.steps)
    hist["val"].append(pt.estimate_loss(model, val_data, args, device, args.seed + 2))
    hist["ortho"] = max((float(orthogonality_error(p).max()) for p in factors), default=float("nan"))
    return hist


def print_table(results: dict[str, dict], title: str) -> None:
    print(title)
    print("| method               | trainable | val loss start | val loss end | ms / iter | ms / opt step | max ortho err |")
    print("|----------------------|----------:|---------------:|-------------:|----------:|--------------:|--------------:|")
    for name, h in results.items():
        ortho = "n/a" if math.isnan(h["ortho"]) else f"{h['ortho']:.2e}"  # AdamW: no factor
        print(f"| {LABELS[name]:<20} | {h['params']:9,d} | {h['val'][0]:14.4f} | {h['val'][-1]:12.4f} | "
              f"{pt._median_ms(h['iter_s']):9.1f} | {pt._median_ms(h['opt_s']):13.2f} | {ortho:>13} |")


def plot(results: dict[str, dict], path: str, title: str) -> None:
    plt = pt.pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, h) in enumerate(results.items()):
        ax.plot(h["val_step"], h["val"], "o-", color=f"C{i}", label=LABELS[name])
    ax.set_xlabel("step")
    ax.set_ylabel("validation cross-entropy (nats / byte)")
    ax.set_title(title)
    ax.legend()
    pt.save_figure(fig, path)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--init-from", default="out/pretrain_gpt/gpt_stiefel-adamw.pt",
                    help="checkpoint of pretrain_gpt.py (pre-trains a tiny one there if missing)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {METHODS}")
    ap.add_argument("--targets", default=",".join(TARGETS), help="module names/suffixes to adapt")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--block-size", type=int, default=0, help="0: the checkpoint's block size")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--lora-alpha", type=float, default=8.0, help="LoRA scale is alpha / rank")
    ap.add_argument("--stella-alpha", type=float, default=None,
                    help="StelLA scale is alpha / rank (default: --lora-alpha, the same scale as LoRA). "
                         "Its non-zero init adds (alpha/r) U V^T, so its start loss is higher")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--retraction", default="cayley_fp", help="Stiefel-AdamW retraction")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--out-dir", default="out/finetune_lora")
    ap.add_argument("--plot", default=None, help="plot path (default OUT_DIR/finetune_lora.png)")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny model, a few steps (tests)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.smoke:
        args.steps, args.batch_size, args.eval_every, args.eval_batches, args.warmup = min(args.steps, 5), 4, 0, 2, 2
        args.rank = min(args.rank, 2)
    if args.threads and not args.device.startswith("cuda"):
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.stella_alpha is None:
        args.stella_alpha = args.lora_alpha
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise SystemExit(f"unknown method(s) {bad}; choose from {METHODS}")
    if not os.path.exists(args.init_from):
        print(f"{args.init_from} not found: pre-training a tiny base model first")
        pre = ["--optimizers", "stiefel-adamw", "--out-dir", os.path.dirname(os.path.abspath(args.init_from)),
               "--no-plot", "--device", args.device]
        pre += (["--smoke"] if args.smoke else ["--steps", "150", "--n-layer", "2", "--d-model", "64",
                                                 "--eval-every", "0", "--eval-batches", "2"])
        pt.main(pre)
        made = os.path.join(os.path.dirname(os.path.abspath(args.init_from)), "gpt_stiefel-adamw.pt")
        if os.path.abspath(made) != os.path.abspath(args.init_from):
            os.replace(made, args.init_from)
    base = load_base(args.init_from, device)
    args.block_size = args.block_size or base.config.block_size
    data = _data.load_corpus("pydoc_topics", 100_000 if args.smoke else None)
    train_data, val_data = _data.split(data)
    print(f"base: {args.init_from} ({sum(p.numel() for p in base.parameters()) / 1e6:.2f}M params); task: "
          f"pydoc topics ({len(train_data):,} train / {len(val_data):,} val bytes); rank {args.rank}, "
          f"{args.steps} steps of {args.batch_size} x {args.block_size} on {device}")
    results = {}
    for m in methods:
        results[m] = finetune(m, base, train_data, val_data, args, device)
        print(f"{LABELS[m]}: val loss {results[m]['val'][0]:.4f} -> {results[m]['val'][-1]:.4f}", flush=True)
    title = f"LoRA fine-tuning (rank {args.rank}, lr {args.lr:g}, {args.steps} steps)"
    print_table(results, title)
    if not args.no_plot:
        plot(results, args.plot or os.path.join(args.out_dir, "finetune_lora.png"), title)
    return 0


if __name__ == "__main__":
    sys.exit(main())

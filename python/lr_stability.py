"""Learning rate against best training loss, LoRA fine-tuning of the recipe GPT (the talk's
"Stepsize stability" figure).

One LoRA fine-tuning run per (method, learning rate) over a log-spaced sweep; the figure plots the
best training loss each run reached against the learning rate, one curve per method. Every run
starts from the same base model and the same adapter draw, sees the same batches in the same
order, and has the same schedule (linear warm-up over ``--warmup`` steps, then a constant learning
rate), the same betas, no weight decay and, by default, **no gradient clipping** (clipping hides the
instability this figure is about).

Base model: the byte-level GPT of ``_gpt.py``, pre-trained on standard-library source code by
``pretrain_gpt.py`` (Stiefel-AdamW, its default sizes: about 30 s on the CPU, cached in
``--out-dir``), or the checkpoint ``--init-from``. Task: the English help texts of
``pydoc_data.topics`` (``_data.py``; nothing downloaded), as in ``finetune_lora.py``. Adapters
(rank ``--rank``) on the attention value/output projections and both MLP linears.

Methods (``--methods``):

* ``adamw``: PEFT LoRA ``W0 + (alpha/r) B A`` (``A`` Kaiming-uniform, ``B = 0``), ``torch.optim.AdamW``.
* ``stiefel-adamw``: the same LoRA, ``A`` made row-orthonormal at the start and kept on the Stiefel
  manifold, ``B`` AdamW: ``stiefel_kernels.integrations.peft.create_stiefel_adamw`` (default
  retraction, ``cayley_fp``); ``stiefel-adamw-polar``: the same with ``retraction="polar"``.
* ``stella``: StelLA ``W0 + (alpha/r) U S V^T`` (``stiefel_kernels.nn.inject_stella``, random
  orthonormal ``U``, ``V``, ``S = I``: non-zero at the start, as in the paper) trained by
  ``torch.optim.AdamW`` with the Riemannian hooks (``make_stella_optimizer``: projected gradient,
  update scaled by ``1/sqrt(m/c)``, polar retraction).
* ``scaled-adamw``: the same PEFT LoRA with PEFT's own Scaled AdamW (Zhang & Pilanci 2024, the
  ``r x r``-preconditioned optimizer): ``peft.optimizers.create_riemannian_optimizer(model,
  torch.optim.AdamW, lr=lr)`` (its default ``reg = 1e-2``).

Without PEFT installed the LoRA methods use ``finetune_lora.py``'s ``LoRALinear`` and
``scaled-adamw`` is skipped (said in the output).

Per run: the loss of every step (the loss of the batch before that step's update). The *best
training loss* is the minimum of its trailing ``--smooth``-step mean (per-batch losses are noisy,
a minimum over them would mostly measure the noise). A run is *diverged* when a loss is NaN/Inf
or the mean of its last ``--smooth`` losses is above its start (the mean loss of the untouched
adapted model on the run's first ``--smooth`` batches); a run stops at its first non-finite loss or
once its loss is above ``--blowup`` times its start. Diverged
runs are drawn as an x at the top of the plot and marked in the table, with the best loss they
reached before diverging.

Run:   python python/lr_stability.py                      (CPU: about 10 minutes, progress bar)
       python python/lr_stability.py --device cuda --steps 2000 --batch-size 64 --block-size 256 \\
              --n-layer 6 --d-model 384 --n-head 6 --pretrain-steps 3000 --rank 16
       python python/lr_stability.py --smoke              (seconds: the tests)
       python python/lr_stability.py --replot out/lr_stability/lr_stability.json --plot FILE.png
       python python/lr_stability.py --help
Writes ``OUT_DIR/lr_stability.png``, ``OUT_DIR/lr_stability.md`` (table) and
``OUT_DIR/lr_stability.json`` (every run's loss history); ``--plot``/``--table``/``--json`` move them.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _data  # noqa: E402
import finetune_lora as fl  # noqa: E402
import pretrain_gpt as pt  # noqa: E402

from stiefel_kernels import StiefelAdamW, orthonormalize_  # noqa: E402
from stiefel_kernels.geometry import orthogonality_error  # noqa: E402
from stiefel_kernels.nn import inject_stella, make_stella_optimizer  # noqa: E402

try:  # optional: PEFT's LoRA modules and its Scaled AdamW
    import peft
    from peft import LoraConfig, get_peft_model
    from peft.optimizers import create_riemannian_optimizer

    from stiefel_kernels.integrations.peft import create_stiefel_adamw
except ImportError:  # pragma: no cover - exercised only without the optional dependency
    peft = None

METHODS = ("adamw", "stiefel-adamw", "stiefel-adamw-polar", "stella", "scaled-adamw")
LABELS = {
    "adamw": "AdamW (LoRA)",
    "stiefel-adamw": "Stiefel-AdamW (cayley_fp)",
    "stiefel-adamw-polar": "Stiefel-AdamW (polar)",
    "stella": "StelLA (AdamW + hooks)",
    "scaled-adamw": "Scaled AdamW (PEFT)",
}
STYLES = {"adamw": "o-", "stiefel-adamw": "s-", "stiefel-adamw-polar": "D--", "stella": "^-",
          "scaled-adamw": "v-"}
DEFAULT_LRS = "1e-4,3e-4,1e-3,2e-3,5e-3,1e-2,2e-2,3e-2,5e-2,0.1,0.2,0.5,1"


# ----------------------------------------------------------------------------- summary of a run

@torch.no_grad()
def start_loss(model, train_data, args, device) -> float:
    """The loss of ``model`` before training: the mean over the first ``--smooth`` training batches
    (the batches the run will see first, so every method is compared with its own start)."""
    g = torch.Generator().manual_seed(args.seed + 1)
    losses = []
    for _ in range(max(1, args.smooth)):
        x, y = _data.get_batch(train_data, args.batch_size, args.block_size, g, device)
        losses.append(model(x, y)[1].item())
    return sum(losses) / len(losses)


def summarize(losses: list[float], smooth: int = 20, start: float | None = None) -> dict:
    """``{"start", "best", "final", "diverged", "reason", "steps"}`` of one run's per-step losses.

    ``start``: the loss before training (default: the first loss). ``best``: the minimum of the
    trailing ``smooth``-step mean over the finite prefix (``nan`` if the first loss is already
    non-finite). ``diverged``: a non-finite loss, or the mean of the last ``smooth`` losses above
    ``start``. ``reason``: ``"nan"`` / ``"above start"`` / ``""``.
    """
    if not losses:
        raise ValueError("summarize: empty loss history")
    finite = []
    for x in losses:
        if not math.isfinite(x):
            break
        finite.append(x)
    start = losses[0] if start is None else start
    best = math.nan
    if finite:
        w = max(1, min(smooth, len(finite)))
        acc = sum(finite[:w])
        best = acc / w
        for i in range(w, len(finite)):
            acc += finite[i] - finite[i - w]
            best = min(best, acc / w)
    if len(finite) < len(losses):
        return {"start": start, "best": best, "final": math.nan, "diverged": True, "reason": "nan",
                "steps": len(losses)}
    tail = finite[-max(1, min(smooth, len(finite))):]
    final = sum(tail) / len(tail)
    above = final > start
    return {"start": start, "best": best, "final": final, "diverged": above,
            "reason": "above start" if above else "", "steps": len(losses)}


# ----------------------------------------------------------------------------- methods

def _lora_model(base, args):
    """PEFT LoRA (or ``finetune_lora.LoRALinear`` without PEFT) on a copy of ``base``; returns
    ``(model, [(A, B), ...])``. The adapter draw is seeded: the same for every LoRA method."""
    model = copy.deepcopy(base)
    torch.manual_seed(args.seed + 7)
    if peft is not None:
        cfg = LoraConfig(r=args.rank, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                         target_modules=list(args.targets))
        model = get_peft_model(model, cfg)
        from stiefel_kernels.integrations.peft import lora_pairs
        return model, [(a, b) for _, a, _, b in lora_pairs(model)]
    mods = fl.inject_lora(model, args.targets, args.rank, args.lora_alpha)
    return model, [(m.A, m.B) for m in mods]


def setup(method: str, base, lr: float, args):
    """``(model, optimizer, stiefel_factors)`` for one method at learning rate ``lr``."""
    kw = dict(lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    if method == "stella":
        model = copy.deepcopy(base)
        torch.manual_seed(args.seed + 7)
        mods = inject_stella(model, args.targets, r=args.rank, alpha=args.stella_alpha)
        opt, _hooks = make_stella_optimizer(model, torch.optim.AdamW, **kw)
        return model, opt, [p for m in mods for p in (m.U, m.V)]
    model, pairs = _lora_model(base, args)
    if method == "adamw":
        params = [p for p in model.parameters() if p.requires_grad]
        return model, torch.optim.AdamW(params, **kw), []
    if method == "scaled-adamw":
        if peft is None:
            raise RuntimeError("scaled-adamw needs PEFT (pip install peft)")
        return model, create_riemannian_optimizer(model, torch.optim.AdamW, **kw), []
    retraction = "polar" if method == "stiefel-adamw-polar" else args.retraction
    if peft is not None:
        opt = create_stiefel_adamw(model, retraction=retraction, **kw)
        return model, opt, [a for a, _ in pairs]
    with torch.no_grad():
        for a, b in pairs:
            r = orthonormalize_(a)  # A_old = R^T A_new: keep B A
            b.copy_(b @ r.mT)
    opt = StiefelAdamW([{"params": [a for a, _ in pairs], "stiefel": True},
                        {"params": [b for _, b in pairs]}], retraction=retraction, **kw)
    return model, opt, [a for a, _ in pairs]


def run(method: str, lr: float, base, train_data, args, device, bar=None) -> dict:
    """One fine-tuning run; returns its loss history, summary and timing."""
    model, opt, factors = setup(method, base, lr, args)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, args.warmup)))
    trainable = [p for p in model.parameters() if p.requires_grad]
    t0 = time.perf_counter()
    start = start_loss(model, train_data, args, device)
    g = torch.Generator().manual_seed(args.seed + 1)  # the same batches for every run
    losses: list[float] = []
    for _step in range(args.steps):
        x, y = _data.get_batch(train_data, args.batch_size, args.block_size, g, device)
        _, loss = model(x, y)
        value = loss.item()
        losses.append(value)
        if bar is not None:
            bar.update(1)
        if not math.isfinite(value) or value > args.blowup * start:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip)
        opt.step()
        sched.step()
    if bar is not None and len(losses) < args.steps:
        bar.update(args.steps - len(losses))  # a run stopped early: skip its remaining steps
    wall = time.perf_counter() - t0
    out = summarize(losses, args.smooth, start)
    out.update(method=method, lr=lr, losses=losses, wall_s=wall,
               ortho=max((float(orthogonality_error(p).max()) for p in factors), default=math.nan))
    return out


# ----------------------------------------------------------------------------- outputs

def _cell(r: dict) -> str:
    if math.isnan(r["best"]):
        return "× div (NaN at step 0)"
    if r["diverged"]:
        why = f"NaN at step {r['steps'] - 1}" if r["reason"] == "nan" else (
            f"stopped at step {r['steps'] - 1}, loss > {r['blowup']:g}x start"
            if r["steps"] < r["planned"] else "ends above start")
        return f"× div ({why}; best {r['best']:.4f})"
    return f"{r['best']:.4f}"


def markdown_table(results: list[dict], methods: list[str], lrs: list[float]) -> str:
    """Rows = learning rates, columns = methods; a cell is the best loss, or ``× div (...)``."""
    by = {(r["method"], r["lr"]): r for r in results}
    lines = ["| lr | " + " | ".join(LABELS[m] for m in methods) + " |",
             "|---:|" + "|".join("---:" for _ in methods) + "|"]
    for lr in lrs:
        cells = [_cell(by[(m, lr)]) if (m, lr) in by else "–" for m in methods]
        lines.append(f"| {lr:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def stable_summary(results: list[dict], methods: list[str], tol: float = 0.02) -> list[str]:
    """Per method: how many learning rates did not diverge, the largest one, the overall best
    loss and the range of learning rates within ``tol`` (relative) of that best."""
    out = []
    for m in methods:
        rs = sorted((r for r in results if r["method"] == m), key=lambda r: r["lr"])
        ok = [r for r in rs if not r["diverged"]]
        if not ok:
            out.append(f"{LABELS[m]}: diverged at every learning rate")
            continue
        best = min(ok, key=lambda r: r["best"])
        near = [r["lr"] for r in ok if r["best"] <= best["best"] * (1 + tol)]
        out.append(f"{LABELS[m]}: no divergence at {len(ok)}/{len(rs)} learning rates (largest {ok[-1]['lr']:g}); "
                   f"best loss {best['best']:.4f} at lr {best['lr']:g}; within {100 * tol:g}% of it for lr in "
                   f"[{min(near):g}, {max(near):g}]")
    return out


def plot(results: list[dict], methods: list[str], lrs: list[float], path: str, title: str,
         start_loss: float | None) -> None:
    plt = pt.pyplot()
    if plt is None:
        return
    from matplotlib.transforms import blended_transform_factory

    fig, ax = plt.subplots(figsize=(9.8, 4.8))
    finite_best = [r["best"] for r in results if not r["diverged"] and math.isfinite(r["best"])]
    for i, m in enumerate(methods):
        rs = sorted((r for r in results if r["method"] == m), key=lambda r: r["lr"])
        if not rs:
            continue
        color = f"C{i}"
        ok = [r for r in rs if not r["diverged"]]
        ax.plot([r["lr"] for r in ok], [r["best"] for r in ok], STYLES.get(m, "o-"), color=color,
                label=LABELS[m], ms=5, alpha=0.9)
        div = [r for r in rs if r["diverged"]]
        if div:
            trans = blended_transform_factory(ax.transData, ax.transAxes)
            ax.plot([r["lr"] for r in div], [0.965 - 0.035 * i] * len(div), "x", color=color, ms=6, mew=1.8,
                    transform=trans, clip_on=False)
    if start_loss is not None:
        ax.axhline(start_loss, color="gray", lw=0.8, ls=":", label="base model (LoRA start)")
    ax.set_xscale("log")
    if finite_best:
        lo, hi = min(finite_best), max(finite_best + ([start_loss] if start_loss else []))
        span = hi - lo or 1.0
        ax.set_ylim(lo - 0.05 * span, hi + 0.3 * span)  # head room for the x marks of diverged runs
    ax.set_xlabel("learning rate (constant after warm-up)")
    ax.set_ylabel(f"best training loss (nats/byte, {results[0].get('smooth', 20)}-step mean)")
    ax.set_title(title, fontsize=10)
    ax.plot([], [], "x", color="k", label="diverged (NaN or ends above start)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(True, which="both", alpha=0.25)
    pt.save_figure(fig, path)


# ----------------------------------------------------------------------------- driver

def _bar(total: int, desc: str):
    try:
        from tqdm.auto import tqdm
        return tqdm(total=total, desc=desc, file=sys.stderr, unit="step", smoothing=0.05)
    except ImportError:  # a no-frills stand-in
        class _Plain:
            def __init__(self):
                self.n, self.every = 0, max(1, total // 20)

            def update(self, k):
                before, self.n = self.n, self.n + k
                if before // self.every != self.n // self.every:
                    print(f"  {desc}: {self.n}/{total} steps", file=sys.stderr, flush=True)

            def set_postfix_str(self, s):
                pass

            def close(self):
                pass
        return _Plain()


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def base_model(args, device):
    """The base GPT: ``--init-from``, else a checkpoint of ``pretrain_gpt.py`` cached under
    ``--out-dir`` (pre-trained now if missing, with ``--n-layer/--d-model/--n-head/--block-size/
    --pretrain-steps``)."""
    path = args.init_from
    if not path:
        tag = (f"L{args.n_layer}_d{args.d_model}_h{args.n_head}_b{args.block_size}_s{args.pretrain_steps}"
               f"_seed{args.seed}" + ("_smoke" if args.smoke else ""))
        path = os.path.join(args.out_dir, f"base_{tag}.pt")
        if not os.path.exists(path):
            print(f"pre-training the base model ({path}) with pretrain_gpt.py", flush=True)
            folder = os.path.join(args.out_dir, f"pretrain_{tag}")
            pre = ["--optimizers", "stiefel-adamw", "--out-dir", folder, "--no-plot", "--device", args.device,
                   "--seed", str(args.seed), "--threads", str(args.threads)]
            pre += (["--smoke"] if args.smoke else
                    ["--steps", str(args.pretrain_steps), "--n-layer", str(args.n_layer), "--d-model",
                     str(args.d_model), "--n-head", str(args.n_head), "--block-size", str(args.block_size),
                     "--eval-every", "0"])
            pt.main(pre)
            os.replace(os.path.join(folder, "gpt_stiefel-adamw.pt"), path)
    return fl.load_base(path, device), path


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {METHODS}")
    ap.add_argument("--lrs", default=DEFAULT_LRS, help="comma-separated learning rates")
    ap.add_argument("--steps", type=int, default=250, help="fine-tuning steps per run")
    ap.add_argument("--warmup", type=int, default=10, help="linear warm-up steps, then constant lr")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rank", type=int, default=8, help="adapter rank")
    ap.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA scale is alpha / rank")
    ap.add_argument("--stella-alpha", type=float, default=None,
                    help="StelLA scale is alpha / rank (default: --lora-alpha)")
    ap.add_argument("--targets", default=",".join(fl.TARGETS), help="module names/suffixes to adapt")
    ap.add_argument("--retraction", default="cayley_fp", help="retraction of the 'stiefel-adamw' method")
    ap.add_argument("--grad-clip", type=float, default=0.0, help="max gradient norm (0: no clipping)")
    ap.add_argument("--smooth", type=int, default=20, help="window of the running mean (best / final loss)")
    ap.add_argument("--blowup", type=float, default=3.0,
                    help="stop a run once its loss exceeds this times its start (it has diverged)")
    ap.add_argument("--init-from", default="", help="base checkpoint of pretrain_gpt.py (default: pre-train "
                    "one with the sizes below, cached in --out-dir)")
    ap.add_argument("--pretrain-steps", type=int, default=800, help="steps of the base model's pre-training")
    ap.add_argument("--n-layer", type=int, default=2, help="base model size (when pre-training it)")
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=64, help="context (0: the checkpoint's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--out-dir", default="out/lr_stability")
    ap.add_argument("--plot", default=None, help="PNG path (default OUT_DIR/lr_stability.png; '' for none)")
    ap.add_argument("--table", default=None, help="markdown path (default OUT_DIR/lr_stability.md)")
    ap.add_argument("--json", default=None, help="histories (default OUT_DIR/lr_stability.json)")
    ap.add_argument("--smoke", action="store_true", help="tiny model, two learning rates, a few steps (tests)")
    ap.add_argument("--replot", default=None, metavar="JSON",
                    help="only redraw the plot (--plot) from the histories file of an earlier run")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.replot:
        with open(args.replot) as f:
            saved = json.load(f)
        plot(saved["results"], saved["methods"], saved["lrs"], args.plot or os.path.join(args.out_dir, "lr_stability.png"),
             saved.get("title", ""), saved.get("lora_start"))
        return 0
    if args.smoke:
        args.steps, args.batch_size, args.warmup, args.smooth = min(args.steps, 6), 4, 2, 3
        args.rank, args.lora_alpha = min(args.rank, 2), 4.0
        if args.lrs == DEFAULT_LRS:
            args.lrs = "1e-3,1"
        args.n_layer, args.n_head, args.d_model, args.block_size = 1, 2, 32, 32
    if args.threads and not args.device.startswith("cuda"):
        torch.set_num_threads(args.threads)
    if args.stella_alpha is None:
        args.stella_alpha = args.lora_alpha
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise SystemExit(f"unknown method(s) {bad}; choose from {METHODS}")
    if peft is None and "scaled-adamw" in methods:
        print("PEFT is not installed: skipping scaled-adamw (pip install peft)", file=sys.stderr)
        methods.remove("scaled-adamw")
    lrs = sorted(float(s) for s in args.lrs.split(",") if s.strip())
    device = torch.device(args.device)
    os.makedirs(args.out_dir, exist_ok=True)

    t_all = time.perf_counter()
    base, base_path = base_model(args, device)
    args.block_size = base.config.block_size if not args.block_size else min(args.block_size, base.config.block_size)
    data = _data.load_corpus("pydoc_topics", 100_000 if args.smoke else None)
    train_data, _ = _data.split(data)
    n_base = sum(p.numel() for p in base.parameters())
    head = (f"base {base_path} ({n_base / 1e6:.2f}M params, {base.config.n_layer} layers, d_model "
            f"{base.config.d_model}); task: pydoc topics ({len(train_data):,} train bytes); rank {args.rank}, "
            f"LoRA alpha {args.lora_alpha:g}, StelLA alpha {args.stella_alpha:g}; {args.steps} steps of "
            f"{args.batch_size} x {args.block_size} bytes, warm-up {args.warmup} then constant lr, "
            f"grad clip {args.grad_clip or 'none'}, no weight decay; {device}, "
            f"{torch.get_num_threads()} thread(s); LoRA modules: "
            f"{'PEFT ' + peft.__version__ if peft is not None else 'finetune_lora.LoRALinear'}")
    print(head, flush=True)

    results = []
    bar = _bar(len(methods) * len(lrs) * args.steps, "lr sweep")
    for lr in lrs:
        for m in methods:
            bar.set_postfix_str(f"{m} lr={lr:g}")
            r = run(m, lr, base, train_data, args, device, bar)
            r.update(smooth=args.smooth, blowup=args.blowup, planned=args.steps)
            results.append(r)
    bar.close()
    wall = time.perf_counter() - t_all

    table = markdown_table(results, methods, lrs)
    summary = stable_summary(results, methods)
    print(table)
    print()
    print("\n".join(summary))
    print(f"total wall time {wall:.1f} s")
    title = (f"LoRA r={args.rank} on a {n_base / 1e6:.2f}M GPT (code -> English prose), "
             f"{args.steps} steps, batch {args.batch_size}x{args.block_size}, "
             + (f"clip {args.grad_clip:g}" if args.grad_clip else "no clipping"))
    plot_path = os.path.join(args.out_dir, "lr_stability.png") if args.plot is None else args.plot
    lora_start = next((r["start"] for r in results if r["method"] != "stella"), None)
    if plot_path:
        plot(results, methods, lrs, plot_path, title, lora_start)
    table_path = args.table or os.path.join(args.out_dir, "lr_stability.md")
    cmd = " ".join(["python python/lr_stability.py", *(sys.argv[1:] if argv is None else argv)])
    with open(table_path, "w") as f:
        f.write(f"# Learning rate vs best training loss\n\nCommand: `{cmd}`  \n"
                f"Machine: {cpu_model()} ({os.cpu_count()} CPUs), "
                + (f"{torch.cuda.get_device_name(device)}, " if device.type == "cuda" else "")
                + f"torch "
                f"{torch.__version__}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; wall time "
                f"{wall:.0f} s.  \n{head}.\n\nCells: best training loss (minimum of the {args.smooth}-step "
                f"running mean of the per-batch loss, nats/byte); `× div`: diverged (a NaN/Inf loss, or the "
                f"mean of the last {args.smooth} losses above the loss before training), with the best loss reached before.\n\n"
                + table + "\n\n" + "\n".join(f"* {s}" for s in summary) + "\n")
    print(f"table written to {table_path}")
    json_path = args.json or os.path.join(args.out_dir, "lr_stability.json")
    with open(json_path, "w") as f:
        json.dump({"command": cmd, "header": head, "wall_s": wall, "methods": methods, "lrs": lrs,
                   "title": title, "lora_start": lora_start, "results": results}, f, allow_nan=True)
    print(f"histories written to {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

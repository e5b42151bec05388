"""Side-by-side ``optimizer.step()`` benchmark: StiefelAdamW against what people would otherwise pick.

The step alone: gradients pre-filled once, no forward/backward; each optimizer gets fresh copies
of the same parameters and gradients (same values for every optimizer), runs ``--warmup`` steps
(the first allocates the state), then ``--rounds`` timed steps; the median is reported. All in
one process, each config at each ``--threads`` count (``torch.set_num_threads``).

Optimizers (columns):

* ``AdamW foreach`` / ``AdamW fused``: ``torch.optim.AdamW(foreach=True)`` / ``(fused=True)`` on
  all parameters (factors and B alike; it does not keep anything orthonormal). Fused AdamW is the
  baseline of every ratio.
* ``StiefelAdamW torch``: ``stiefel_kernels.StiefelAdamW`` with ``backend="torch"`` (on the CPU
  the native fused passes when the extension is built), A factors in a ``stiefel`` group, B at
  the Euclidean group's default (fused AdamW where torch has it). ``StiefelAdamW reference``:
  the same with the slow reference backend, only on the smallest config. On CUDA the ``triton``
  backend is added.
* ``geoopt EuclideanStiefel (QR)`` / ``geoopt Stiefel (canonical)``: ``geoopt.optim.RiemannianAdam``
  with the A factors as ``ManifoldParameter``s in column form (``n x r``, orthonormal columns,
  geoopt's convention: a wide LoRA ``A`` is stored as ``A^T``) on ``geoopt.EuclideanStiefel()``
  (projection ``u - x sym(x^T u)``, QR retraction) or ``geoopt.Stiefel()`` (canonical metric,
  Cayley retraction that solves an ``n x n`` system: only where ``n <= 1024``); B factors plain
  parameters. geoopt is optional (``pip install geoopt`` or the ``bench`` extra).
* ``StelLA official-style``: fused AdamW plus StelLA's pre/post step hooks written here from
  the official code (github.com/SonyResearch/stella, ``StellaModel.pre_optimizer_step`` /
  ``post_optimizer_step``, transcribed in docs/stella.md), one plain torch function per bucket
  of same column-form shape: pre ``grad <- grad - X grad^T X`` on the stacked factors (and a
  cache of ``X``), post ``Delta = (Y - X) / sqrt(m / c)`` (skipped where ``m == c`` or no ``c``),
  ``xi = Delta - X sym(X^T Delta)``, polar retraction ``U V^T`` of a batched
  ``torch.linalg.svd(X + xi)``. ``c`` is the model's hidden size (4096 for the LoRA configs,
  768 for GPT-2; none for the bare-factor configs). Factors out of weight decay, as there.
* ``StelLA make_riemannian``: fused AdamW with ``stiefel_kernels.make_riemannian`` (the same
  rule, the retraction by the Gram fast path).
* ``PEFT Scaled AdamW``: ``peft.optimizers.create_riemannian_optimizer(model, torch.optim.AdamW,
  fused=True)`` (Zhang & Pilanci's ``r x r`` preconditioned LoRA, no orthonormality) on a module
  whose parameters are named ``...lora_A.weight`` / ``...lora_B.weight``; only on LoRA configs.

Configs: LoRA r=16 / r=64 on 7B-style shapes (``bench_step.make_case``; 8 layers are its first
8 layers), GPT-2 QK (``bench_step``'s ``gpt2_qk``), one ``16 x 1,000,000`` factor and 512
factors ``8 x 64`` (factors only, no B).

``--interleave``: build every optimizer of a config first, then time them in turns (round ``i``
times one step of each, starting at a different optimizer every round), so that all of them
see the same state of a shared machine; the ratio to fused AdamW is then the median over the
rounds of each round's ratio (paired), which drifts in the machine's speed during a block
(fused AdamW's own GPT-2 step moved between 7.5 and 9.5 ms from run to run on this project's
VM) do not move. Every optimizer's state lives at once (memory: their sum).

Reported per config and thread count: median ms (and min), ratio to fused AdamW, minor page
faults per step (``getrusage``; fresh pages touched by per-step temporaries), optimizer-state
bytes (sum of ``nbytes`` of every tensor in ``optimizer.state``, and of the per-bucket buffers
StiefelAdamW keeps between steps, its ``_workspace``; StelLA's per-step cache of ``X`` is
transient and not counted). An optimizer whose first step takes more than
``--max-step-s`` (20 s) is skipped on that config with the reason printed.

Usage::

    python bench/bench_peers.py --threads 1 2 --out bench/results/cpu-peers-DATE.md
    python bench/bench_peers.py --configs gpt2_qk factors_512x8x64 --threads 1 --rounds 5
    python bench/bench_peers.py --configs lora_r16_L32 gpt2_qk --optimizers adamw_fused \
        stiefel_torch --threads 1 2 --rounds 31 --interleave
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import math
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import stiefel_kernels  # noqa: E402
from _machine import cpu_model, cpu_pressure_psi as cpu_pressure  # noqa: E402
from bench_step import Case, make_case  # noqa: E402

try:
    import geoopt
except ImportError:  # optional benchmark dependency
    geoopt = None

try:
    import peft
    from peft.optimizers import create_riemannian_optimizer
except ImportError:
    peft = None
    create_riemannian_optimizer = None

LR = 1e-3
WD = 1e-2


# ----------------------------------------------------------------------------- configs
@dataclass
class Config:
    name: str
    case: Case
    hidden: int | None  # StelLA's c (the model's hidden size), None for bare factors
    lora: bool          # A (stiefel) and B (euclid) are LoRA pairs (index by index)
    smallest: bool = False


def _lora(r: int, layers: int) -> Config:
    case = make_case(f"lora7b_r{r}")
    per_layer = len(case.stiefel_shapes) // 32
    n = per_layer * layers
    note = case.note.replace("32 layers", f"{layers} layers")
    return Config(f"lora_r{r}_L{layers}",
                  Case(f"lora_r{r}_L{layers}", case.stiefel_shapes[:n], case.euclid_shapes[:n], note),
                  hidden=4096, lora=True)


def make_config(name: str) -> Config:
    if name.startswith("lora_r"):
        r, layers = name[len("lora_r"):].split("_L")
        return _lora(int(r), int(layers))
    if name == "gpt2_qk":
        return Config(name, make_case("gpt2_qk"), hidden=768, lora=False)
    if name == "factor_16x1M":
        return Config(name, Case(name, [(16, 1_000_000)], [], "one 16 x 1,000,000 factor (wide, "
                                 "orthonormal rows), no B"), hidden=None, lora=False)
    if name == "factors_512x8x64":
        return Config(name, Case(name, [(8, 64)] * 512, [], "512 factors 8 x 64 (wide), no B"),
                      hidden=None, lora=False, smallest=True)
    raise ValueError(name)


CONFIGS = ("lora_r16_L8", "lora_r16_L32", "lora_r64_L8", "lora_r64_L32", "gpt2_qk",
           "factor_16x1M", "factors_512x8x64")

OPTIMIZERS = ("adamw_foreach", "adamw_fused", "stiefel_torch", "stiefel_triton", "stiefel_reference",
              "geoopt_euclidean_stiefel", "geoopt_stiefel", "stella_official", "stella_make_riemannian",
              "peft_scaled_adamw")
LABELS = {
    "adamw_foreach": "AdamW foreach",
    "adamw_fused": "AdamW fused",
    "stiefel_torch": "StiefelAdamW torch",
    "stiefel_triton": "StiefelAdamW triton",
    "stiefel_reference": "StiefelAdamW reference",
    "geoopt_euclidean_stiefel": "geoopt EuclideanStiefel (QR)",
    "geoopt_stiefel": "geoopt Stiefel (canonical)",
    "stella_official": "StelLA official-style (AdamW + SVD polar)",
    "stella_make_riemannian": "StelLA make_riemannian (AdamW + Gram polar)",
    "peft_scaled_adamw": "PEFT Scaled AdamW",
}


# ----------------------------------------------------------------------------- parameters
def pristine(cfg: Config, device, seed: int = 0):
    """Parameters and gradients (plain tensors) of a config, made once per config."""
    gen = torch.Generator().manual_seed(seed)
    a = [stiefel_kernels.random_stiefel(*s, generator=gen).to(device) for s in cfg.case.stiefel_shapes]
    b = [(0.02 * torch.randn(*s, generator=gen)).to(device) for s in cfg.case.euclid_shapes]
    ga = [(0.01 * torch.randn(*s, generator=gen)).to(device) for s in cfg.case.stiefel_shapes]
    gb = [(0.01 * torch.randn(*s, generator=gen)).to(device) for s in cfg.case.euclid_shapes]
    return a, b, ga, gb


def fresh(tensors, grads, transpose: bool = False, cls=torch.nn.Parameter, **kw):
    """New parameters with copies of ``tensors`` and their gradients (``transpose``: column form,
    contiguous, for geoopt)."""
    out = []
    for t, g in zip(tensors, grads):
        if transpose and t.shape[-2] < t.shape[-1]:
            t, g = t.mT, g.mT
        p = cls(t.contiguous().clone(), **kw)
        p.grad = g.contiguous().clone()
        out.append(p)
    return out


def state_bytes(opt) -> int:
    seen, total = set(), 0

    def walk(x):
        nonlocal total
        if isinstance(x, torch.Tensor):
            key = (x.untyped_storage().data_ptr(), x.dtype, tuple(x.shape))
            if key not in seen:
                seen.add(key)
                total += x.nbytes
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        elif callable(getattr(x, "tensors", None)):  # a bucket's buffers in the workspace
            walk(x.tensors())

    for st in opt.state.values():
        walk(st)
    inner = getattr(opt, "opt", opt)  # a stepper: its optimizer
    walk(getattr(inner, "_workspace", None) or {})  # buffers StiefelAdamW keeps between steps
    return total


# ----------------------------------------------------------------------------- StelLA, official style
def _col(t: torch.Tensor) -> torch.Tensor:
    # official: ``p if p.size(0) > p.size(1) else p.t()``
    return t if t.size(0) > t.size(1) else t.t()


class StellaOfficialStep:
    """Fused AdamW with StelLA's pre/post optimizer-step hooks as the official code does them
    (stella/tuner/model.py, ``pre_optimizer_step`` / ``post_optimizer_step``; stiefel.py's
    ``euclidean2riemannian``, ``tangent_project``, ``polar_retraction``), per bucket of factors
    with the same column-form shape."""

    def __init__(self, a, b, c: float | None):
        groups = [{"params": a, "weight_decay": 0.0}] + ([{"params": b}] if b else [])
        self.opt = torch.optim.AdamW(groups, lr=LR, weight_decay=WD, fused=True)
        self.state = self.opt.state
        self.c = c
        self.params: dict[tuple, list] = {}
        for p in a:
            self.params.setdefault(tuple(_col(p).shape), []).append(p)
        self.cache: dict[tuple, torch.Tensor] = {}

    @torch.no_grad()
    def pre(self):
        self.cache = {}
        for k, ps in self.params.items():
            x = torch.stack([_col(p) for p in ps], dim=0)
            self.cache[k] = x.detach()
            g = torch.stack([_col(p.grad) for p in ps], dim=0)
            g_r = g - x @ (g.mT @ x)                               # euclidean2riemannian
            for p, gr in zip(ps, g_r):
                p.grad.copy_(gr if p.size(0) > p.size(1) else gr.t())

    @torch.no_grad()
    def post(self):
        for k, pre_ps in self.cache.items():
            ps = self.params[k]
            grad = torch.stack([_col(p) for p in ps], dim=0) - pre_ps
            m = grad.size(1)
            if self.c is not None and m != self.c:
                grad.div_(math.sqrt(m / self.c))                  # gradient scaling
            xtg = pre_ps.mT @ grad
            grad = grad - pre_ps @ (0.5 * (xtg + xtg.mT))         # tangent_project
            u, _, vt = torch.linalg.svd(pre_ps + grad, full_matrices=False)
            new = u @ vt                                          # polar_retraction
            for p, xo in zip(ps, new):
                p.copy_(xo if p.size(0) > p.size(1) else xo.t())
        self.cache = {}

    def step(self):
        self.pre()
        self.opt.step()
        self.post()


class _Stepper:
    """``step()`` of an optimizer, keeping the objects it needs alive (hooks, modules)."""

    def __init__(self, opt, keep=()):
        self.opt, self.keep, self.state = opt, keep, opt.state

    def step(self):
        self.opt.step()


# ----------------------------------------------------------------------------- optimizers
def geoopt_skip(kind: str, cfg: Config) -> str | None:
    if geoopt is None:
        return "not installed (pip install geoopt)"
    if kind == "geoopt_stiefel":
        n = max(max(s) for s in cfg.case.stiefel_shapes)
        if n > 1024:
            return "skipped: n x n solve"
    return None


def why_not(kind: str, cfg: Config, device) -> str | None:
    """Why ``kind`` does not run on ``cfg`` (None: it runs)."""
    if kind == "stiefel_reference" and not cfg.smallest:
        return "not run (slow; smallest config only)"
    if kind == "stiefel_triton" and torch.device(device).type != "cuda":
        return "no CUDA"
    if kind.startswith("geoopt"):
        return geoopt_skip(kind, cfg)
    if kind == "peft_scaled_adamw":
        if create_riemannian_optimizer is None:
            return "not in installed PEFT" if peft is not None else "PEFT not installed"
        if not cfg.lora:
            return "n/a (no LoRA A/B pairs)"
    return None


def build(kind: str, cfg: Config, data):
    a0, b0, ga0, gb0 = data
    if kind in ("adamw_foreach", "adamw_fused"):
        a, b = fresh(a0, ga0), fresh(b0, gb0)
        flag = {"foreach": True} if kind == "adamw_foreach" else {"fused": True}
        return _Stepper(torch.optim.AdamW(a + b, lr=LR, weight_decay=WD, **flag))
    if kind.startswith("stiefel_"):
        a, b = fresh(a0, ga0), fresh(b0, gb0)
        groups = [{"params": a, "stiefel": True}] + ([{"params": b}] if b else [])
        return _Stepper(stiefel_kernels.StiefelAdamW(groups, lr=LR, weight_decay=WD,
                                                     backend=kind[len("stiefel_"):]))
    if kind.startswith("geoopt"):
        man = geoopt.EuclideanStiefel() if kind == "geoopt_euclidean_stiefel" else geoopt.Stiefel()
        a = fresh(a0, ga0, transpose=True, cls=geoopt.ManifoldParameter, manifold=man)
        b = fresh(b0, gb0)
        return _Stepper(geoopt.optim.RiemannianAdam(a + b, lr=LR))
    if kind == "stella_official":
        return StellaOfficialStep(fresh(a0, ga0), fresh(b0, gb0), cfg.hidden)
    if kind == "stella_make_riemannian":
        a, b = fresh(a0, ga0), fresh(b0, gb0)
        groups = [{"params": a, "weight_decay": 0.0}] + ([{"params": b}] if b else [])
        opt = torch.optim.AdamW(groups, lr=LR, weight_decay=WD, fused=True)
        hooks = (stiefel_kernels.make_riemannian(opt, a, c=cfg.hidden) if cfg.hidden
                 else stiefel_kernels.make_riemannian(opt, a, grad_scaling=False))
        return _Stepper(opt, keep=(hooks,))
    if kind == "peft_scaled_adamw":
        a, b = fresh(a0, ga0), fresh(b0, gb0)
        model = torch.nn.ModuleList()
        for pa, pb in zip(a, b):
            layer = torch.nn.Module()
            layer.lora_A = torch.nn.Module()
            layer.lora_B = torch.nn.Module()
            layer.lora_A.weight = pa
            layer.lora_B.weight = pb
            model.append(layer)
        opt = create_riemannian_optimizer(model, torch.optim.AdamW, lr=LR, weight_decay=WD, fused=True)
        return _Stepper(opt, keep=(model,))
    raise ValueError(kind)


# ----------------------------------------------------------------------------- timing
def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _warm(kind: str, cfg: Config, data, device, warmup: int, max_step_s: float):
    """A built optimizer after its ``warmup`` steps (the first allocates the state):
    ``(stepper, {"first_step_s": ...})``, or ``(None, {"skip": why})``."""
    reason = why_not(kind, cfg, device)
    if reason:
        return None, {"skip": reason}
    try:
        stepper = build(kind, cfg, data)
        _sync(device)
        t0 = time.perf_counter()
        stepper.step()
        _sync(device)
        first = time.perf_counter() - t0
        if first > max_step_s:
            return None, {"skip": f"skipped: first step took {first:.1f} s (> {max_step_s:.0f} s)"}
        for _ in range(max(0, warmup - 1)):
            stepper.step()
        _sync(device)
        return stepper, {"first_step_s": first}
    except Exception as exc:  # noqa: BLE001  (reported in the table, not fatal)
        return None, {"skip": f"failed: {type(exc).__name__}: {str(exc)[:100]}"}


def _summary(times: list[float], faults: int, stepper) -> dict:
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
            "rounds": len(times), "faults_per_step": faults / len(times),
            "state_bytes": state_bytes(stepper)}


def time_one(kind: str, cfg: Config, data, device, rounds: int, warmup: int, max_step_s: float) -> dict:
    stepper, out = _warm(kind, cfg, data, device, warmup, max_step_s)
    if stepper is None:
        return out
    try:
        times = []
        flt0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(rounds):
            t0 = time.perf_counter()
            stepper.step()
            _sync(device)
            times.append((time.perf_counter() - t0) * 1e3)
        out.update(_summary(times, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - flt0, stepper))
    except Exception as exc:  # noqa: BLE001  (reported in the table, not fatal)
        out = {"skip": f"failed: {type(exc).__name__}: {str(exc)[:100]}"}
    finally:
        stepper = None  # noqa: F841
        gc.collect()
    return out


def time_interleaved(kinds: list[str], cfg: Config, data, device, rounds: int, warmup: int,
                     max_step_s: float) -> dict[str, dict]:
    """``time_one`` for every kind at once, in turns (``--interleave``): each entry also has
    ``paired_ratio``, the median over the rounds of its step time over fused AdamW's in the
    same round."""
    out: dict[str, dict] = {}
    steppers = {}
    for kind in kinds:
        stepper, out[kind] = _warm(kind, cfg, data, device, warmup, max_step_s)
        if stepper is not None:
            steppers[kind] = stepper
    live = list(steppers)
    times = {k: [] for k in live}
    faults = dict.fromkeys(live, 0)
    try:
        for i in range(rounds):
            for j in range(len(live)):
                kind = live[(i + j) % len(live)]
                flt0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                t0 = time.perf_counter()
                steppers[kind].step()
                _sync(device)
                times[kind].append((time.perf_counter() - t0) * 1e3)
                faults[kind] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - flt0
        base = times.get("adamw_fused")
        for kind in live:
            t = times[kind]
            out[kind].update(_summary(t, faults[kind], steppers[kind]))
            if base:
                out[kind]["paired_ratio"] = statistics.median(a / b for a, b in zip(t, base))
    except Exception as exc:  # noqa: BLE001
        for kind in live:
            out[kind] = {"skip": f"failed: {type(exc).__name__}: {str(exc)[:100]}"}
    finally:
        steppers.clear()
        gc.collect()
    return out


# ----------------------------------------------------------------------------- machine load
def wait_quiet(max_pressure: float, max_wait: float) -> float:
    """Sleep (idle, so this process adds nothing) until the CPU pressure of the last 10 s is at
    most ``max_pressure`` %, at most ``max_wait`` s; returns the seconds waited."""
    t0 = time.perf_counter()
    if cpu_pressure() is None or max_wait <= 0:
        return 0.0
    time.sleep(min(10.0, max_wait))  # let avg10 forget this process's own last block
    while time.perf_counter() - t0 < max_wait:
        if cpu_pressure()[0] <= max_pressure:
            break
        time.sleep(5.0)
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- report
def environment(device) -> dict:
    dev = torch.device(device)
    env = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_model(),
           "cpus": os.cpu_count(), "torch": torch.__version__,
           "stiefel_kernels": getattr(stiefel_kernels, "__version__", "?"),
           "native_cpu_passes": _native_cpu(),
           "geoopt": geoopt.__version__ if geoopt is not None else "not installed",
           "peft": peft.__version__ if peft is not None else "not installed",
           "python": platform.python_version(),
           "date": _dt.datetime.now().isoformat(timespec="seconds"),
           "load_start": os.getloadavg()}
    return env


def _native_cpu() -> bool:
    try:
        from stiefel_kernels import cpu_fused
        return bool(cpu_fused.available())
    except Exception:  # noqa: BLE001
        return False


def _short(reason: str) -> str:
    """A skip reason as a summary-table cell (the per-config tables give it whole)."""
    if reason.startswith("not run"):
        return "–"
    if reason.startswith("n/a"):
        return "n/a"
    return reason


def _cell(r: dict | None, base: float | None) -> str:
    if r is None:
        return "–"
    if "skip" in r:
        return _short(r["skip"])
    paired = r.get("paired_ratio")
    ratio = f" ({paired:.1f}×)" if paired is not None else (f" ({r['median_ms'] / base:.1f}×)" if base else "")
    return f"{r['median_ms']:.1f}{ratio}" if r["median_ms"] >= 10 else f"{r['median_ms']:.2f}{ratio}"


def _load_note(r: dict) -> str:
    s = f"{r['threads']} thr: 1-min load {r['load'][0]:.2f} at start"
    if r.get("pressure_before") is not None:
        s += f", CPU pressure {r['pressure_before']:.1f}% before (after {r['waited_s']:.0f} s idle)"
    if r.get("pressure_during") is not None:
        s += f", {r['pressure_during']:.1f}% during"
    return s


def markdown(report: dict) -> str:
    env = report["environment"]
    kinds = report["optimizers"]
    lines = [f"# optimizer.step() against peers on {env['device']}", "",
             f"{env['device']} ({env['cpus']} logical CPUs), torch {env['torch']}, stiefel_kernels "
             f"{env['stiefel_kernels']} (native CPU passes: {'built' if env['native_cpu_passes'] else 'not built'}), "
             f"geoopt {env['geoopt']}, PEFT {env['peft']}, Python {env['python']}; {env['date']}. "
             f"Step alone (gradients pre-filled, no forward/backward), {report['warmup']} warm-up steps, "
             f"median of {report['rounds']} rounds, one process, lr {LR}, fp32"
             + (" (optimizers timed in turns; × fused: median of the per-round ratios)."
                if report.get("interleave") else "."),
             "", f"Load average at start (1/5/15 min): "
                 + "/".join(f"{x:.2f}" for x in env["load_start"]) + "; per config below "
                 "(it includes this benchmark's own threads). CPU pressure: /proc/pressure/cpu 'some', the "
                 "share of time a runnable task waited for a CPU (another job on this shared machine, or "
                 "this benchmark's own threads outnumbering the free cores); each block waits idle until "
                 f"its last-10-s value is <= {report['max_pressure']}% (at most {report['max_wait']:.0f} s).", ""]
    for threads in report["threads"]:
        rows = [r for r in report["results"] if r["threads"] == threads]
        if not rows:
            continue
        lines += [f"## {threads} thread{'s' if threads > 1 else ''}: median ms (× fused AdamW)", "",
                  "| config | " + " | ".join(LABELS[k] for k in kinds) + " |",
                  "|---|" + "---|" * len(kinds)]
        for row in rows:
            base = row["steps"].get("adamw_fused", {}).get("median_ms")
            lines.append(f"| {row['config']} | " + " | ".join(_cell(row["steps"].get(k), base) for k in kinds) + " |")
        lines += ["", "–: not run (the reference backend runs on the smallest config only); n/a: the "
                  "optimizer does not apply (PEFT's Scaled AdamW needs LoRA A/B pairs); "
                  "\"skipped: n x n solve\": geoopt's canonical Stiefel solves an n x n system per factor, "
                  "run only where n <= 1024.", ""]
    lines += ["## Per config", ""]
    for name in report["configs"]:
        rows = [r for r in report["results"] if r["config"] == name]
        if not rows:
            continue
        note = rows[0]["note"]
        lines += [f"### {name}", "", note + ".", "",
                  "machine load per block: " + "; ".join(_load_note(r) for r in rows) + ".", "",
                  "| optimizer | state MB | " + " | ".join(
                      f"{r['threads']} thr ms (min) | × fused | faults/step" for r in rows) + " |",
                  "|---|---|" + "---|---|---|" * len(rows)]
        for k in kinds:
            cells, sb = [], None
            for r in rows:
                t = r["steps"].get(k)
                base = r["steps"].get("adamw_fused", {}).get("median_ms")
                if t is None or "skip" in t:
                    cells += [t["skip"] if t else "–", "", ""]
                    continue
                sb = t["state_bytes"]
                ratio = t.get("paired_ratio", t["median_ms"] / base if base else None)
                cells += [f"{t['median_ms']:.2f} ({t['min_ms']:.2f})",
                          f"{ratio:.2f}" if ratio is not None else "-", f"{t['faults_per_step']:.0f}"]
            lines.append(f"| {LABELS[k]} | {sb / 1e6:.1f} | " if sb is not None else f"| {LABELS[k]} | – | ")
            lines[-1] += " | ".join(cells) + " |"
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--optimizers", nargs="+", default=None, choices=OPTIMIZERS)
    ap.add_argument("--max-step-s", type=float, default=20.0,
                    help="skip an optimizer on a config whose first step takes longer")
    ap.add_argument("--drop", nargs="*", default=[], metavar="CONFIG@THREADS",
                    help="config/thread-count pairs not to run, e.g. lora_r64_L32@2")
    ap.add_argument("--max-pressure", type=float, default=5.0,
                    help="before each config/thread block, wait idle until /proc/pressure/cpu "
                         "'some avg10' is at most this (%%), up to --max-wait s")
    ap.add_argument("--max-wait", type=float, default=120.0)
    ap.add_argument("--interleave", action="store_true",
                    help="time the optimizers of a config in turns, round by round (paired ratios)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--out", type=Path, default=None, help="also write the Markdown here")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("bench_peers.py: --device cuda but no CUDA device", file=sys.stderr)
        return 2
    kinds = args.optimizers or [k for k in OPTIMIZERS if device == "cuda" or k != "stiefel_triton"]
    if "adamw_fused" not in kinds:
        kinds = ["adamw_fused"] + kinds  # the baseline of every ratio
    report = {"environment": environment(device), "rounds": args.rounds, "warmup": args.warmup,
              "max_pressure": args.max_pressure, "max_wait": args.max_wait, "interleave": args.interleave,
              "threads": args.threads, "configs": args.configs, "optimizers": kinds, "results": []}
    t_start = time.perf_counter()
    for name in args.configs:
        cfg = make_config(name)
        data = pristine(cfg, device)
        for threads in args.threads:
            if f"{name}@{threads}" in args.drop:
                print(f"[{name} @ {threads} threads] dropped (--drop)", file=sys.stderr, flush=True)
                continue
            torch.set_num_threads(threads)
            waited = wait_quiet(args.max_pressure, args.max_wait)
            psi0 = cpu_pressure()
            row = {"config": name, "note": cfg.case.note, "threads": threads, "load": os.getloadavg(),
                   "waited_s": waited, "pressure_before": psi0[0] if psi0 else None, "steps": {}}
            t_block = time.perf_counter()
            if args.interleave:
                row["steps"] = time_interleaved(kinds, cfg, data, device, args.rounds, args.warmup,
                                                args.max_step_s)
                for kind, res in row["steps"].items():
                    msg = res.get("skip") or f"{res['median_ms']:.2f} ms"
                    print(f"[{name} @ {threads} thr] {LABELS[kind]}: {msg} (interleaved, total "
                          f"{time.perf_counter() - t_start:.0f} s)", file=sys.stderr, flush=True)
            for kind in ([] if args.interleave else kinds):
                t0 = time.perf_counter()
                row["steps"][kind] = res = time_one(kind, cfg, data, device, args.rounds, args.warmup,
                                                    args.max_step_s)
                msg = res.get("skip") or f"{res['median_ms']:.2f} ms"
                print(f"[{name} @ {threads} thr] {LABELS[kind]}: {msg} ({time.perf_counter() - t0:.0f} s, "
                      f"total {time.perf_counter() - t_start:.0f} s)", file=sys.stderr, flush=True)
            psi1 = cpu_pressure()
            if psi0 and psi1:  # share of the block's wall time with a task waiting for a CPU
                row["pressure_during"] = (psi1[1] - psi0[1]) / 1e4 / (time.perf_counter() - t_block)
            report["results"].append(row)
        del data
        gc.collect()
    report["environment"]["wall_s"] = time.perf_counter() - t_start
    text = markdown(report) + f"\nWhole run: {report['environment']['wall_s'] / 60:.1f} min.\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

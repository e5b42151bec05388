"""Retraction ablation: time of one retraction and ``||Y^T Y - I||_F`` against the factor size n
(the talk's "matrix size against wall-clock time and orthogonality error" figure).

For every retraction (``cayley_fp``, ``cayley``, ``qr``, ``polar``, ``newton_schulz``), from a point
``X`` (``n x r``, column form, orthonormal) and an Adam-normalized direction ``D`` (``m_hat /
(sqrt(v_hat) + eps)`` after ``--adam-steps`` Adam moment updates with random gradients of
per-entry scales spread over four decades: entries of size ~1, whatever the gradient scale), one
retraction ``Y = R_X(-lr P_X(D))`` is timed and its orthogonality error measured, in three forms:

* ``full``: the literal full-matrix definition of :mod:`stiefel_kernels.geometry`
  (``project_tangent``, then ``retract_cayley_fixed_point`` with the step clipped by
  ``geometry.cayley_step_size`` as the reference backend does, ``retract_cayley`` (the exact
  Cayley transform through Sherman-Morrison-Woodbury; the ``n x n`` solve of
  ``retract_cayley_direct`` is out of reach at these sizes), ``retract_qr`` (``torch.linalg.qr``),
  ``retract_polar`` (thin SVD), ``retract_newton_schulz`` (6 steps)); no orthonormality correction.
* ``gram raw``: the Gram form of :mod:`stiefel_kernels.gram`: ``gram_pass`` (``K, G, H``),
  ``retraction_coefficients`` (``r x r``), ``apply_coefficients`` (``Y = X C + D E``): the same
  retraction computed from three ``r x r`` Gram matrices, without the correction.
* ``gram``: what the optimizer runs (``stiefel_kernels/backends/torch_backend.py``, pure-torch
  formulation): ``gram_pass``, ``step_coefficients`` (the retraction plus the orthonormality
  correction folded into ``C, E`` where ``||Y^T Y - I||_F > drift_tol``, ``drift_tol`` = the
  optimizer's default for the dtype), ``apply_coefficients``. On the CPU the optimizer runs the
  two passes as native fused ops that also update the moments; they are not what is timed here.

Timing: median of ``--repeats`` calls after ``--warmup`` (CUDA: synchronized), at the first
learning rate; the error at every learning rate (it does not depend on the repeat). The input's
own ``||X^T X - I||_F`` (rounding of the stored float32 ``X``) is reported as the floor.

Run:   python bench/retraction_ablation.py                      (CPU, float32, a few minutes)
       python bench/retraction_ablation.py --dtypes float32,float64
       python bench/retraction_ablation.py --device cuda
       python bench/retraction_ablation.py --smoke --out-dir /tmp/x (seconds: the tests)
Writes ``OUT_DIR/retraction_ablation_time.png``, ``..._error.png``, ``retraction_ablation.md``
and ``retraction_ablation.json``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from stiefel_kernels import geometry, gram
from stiefel_kernels.optim import default_drift_tol

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_model, cpu_pressure_psi  # noqa: E402

RETRACTIONS = ("cayley_fp", "cayley", "qr", "polar", "newton_schulz")
FORMS = ("full", "gram raw", "gram")
FORM_STYLE = {"full": dict(ls="--", marker="o", mfc="none"), "gram raw": dict(ls=":", marker="x"),
              "gram": dict(ls="-", marker="s")}
DTYPES = {"float32": torch.float32, "float64": torch.float64}


# ----------------------------------------------------------------------------- inputs

def adam_direction(n: int, r: int, dtype, device, generator: torch.Generator, steps: int = 10,
                   betas=(0.9, 0.999), eps: float = 1e-8) -> torch.Tensor:
    """``D = m_hat / (sqrt(v_hat) + eps)`` (``n x r``) after ``steps`` Adam moment updates with
    Gaussian gradients whose per-entry scale is log-uniform over ``[1e-4, 1]`` (Adam divides it
    out: the entries of ``D`` are of size ~1)."""
    scale = torch.exp(torch.empty(n, r, dtype=torch.float64).uniform_(math.log(1e-4), 0.0, generator=generator))
    m = torch.zeros(n, r, dtype=torch.float64)
    v = torch.zeros(n, r, dtype=torch.float64)
    for _ in range(steps):
        g = scale * torch.randn(n, r, dtype=torch.float64, generator=generator)
        m.lerp_(g, 1 - betas[0])
        v.mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
    m_hat = m / (1 - betas[0] ** steps)
    v_hat = v / (1 - betas[1] ** steps)
    return (m_hat / (v_hat.sqrt() + eps)).to(dtype=dtype, device=device)


# ----------------------------------------------------------------------------- the forms

def full_form(x: torch.Tensor, d: torch.Tensor, lr: float, name: str) -> torch.Tensor:
    """``R_X(-lr P_X(D))`` by the literal definitions of :mod:`stiefel_kernels.geometry`."""
    eta = geometry.project_tangent(x, d)
    step = geometry.cayley_step_size(x, eta, lr) if name == "cayley_fp" else lr
    xi = -step * eta
    if name == "cayley_fp":
        return geometry.retract_cayley_fixed_point(x, xi)
    if name == "cayley":
        return geometry.retract_cayley(x, xi)
    if name == "qr":
        return geometry.retract_qr(x, xi)
    if name == "polar":
        return geometry.retract_polar(x, xi)
    if name == "newton_schulz":
        return geometry.retract_newton_schulz(x, xi)
    raise ValueError(name)


def gram_form(x: torch.Tensor, d: torch.Tensor, lr: float, name: str, correct: bool) -> torch.Tensor:
    """The Gram form: ``gram_pass``, the ``r x r`` coefficients (``step_coefficients`` with the
    optimizer's correction when ``correct``, else ``retraction_coefficients``), ``apply_coefficients``."""
    k, g, h = gram.gram_pass(x, d)
    if correct:
        c, e, _ = gram.step_coefficients(k, g, h, lr, name, tol=default_drift_tol(x.dtype))
    else:
        c, e, _ = gram.retraction_coefficients(k, g, h, lr, name)
    return gram.apply_coefficients(x, d, c.to(x.dtype), e.to(x.dtype))


def retract(form: str, x, d, lr, name):
    if form == "full":
        return full_form(x, d, lr, name)
    return gram_form(x, d, lr, name, correct=form == "gram")


# ----------------------------------------------------------------------------- measurement

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device: torch.device, repeats: int, warmup: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


@torch.no_grad()
def measure(ns, rs, lrs, dtypes, device, repeats: int, warmup: int, adam_steps: int, seed: int,
            progress=None, quiet=None, blocks: list | None = None) -> list[dict]:
    """One row per (dtype, r, n, retraction, form): ``time_s`` (at ``lrs[0]``) and ``err`` per lr.

    ``quiet``: ``(max_pressure, max_wait)``: before each n, wait (idle) until the CPU pressure is
    at most ``max_pressure`` %; ``blocks`` gets, per (dtype, r), the pressure at its start, the
    largest seen after an n, and the seconds waited."""
    rows = []
    for dname in dtypes:
        dtype = DTYPES[dname]
        for r in rs:
            block = {"dtype": dname, "r": r, "waited_s": 0.0, "pressure_before": None, "pressure_max": None}
            for n in ns:
                if n < r:
                    continue
                if quiet is not None:  # before every size: a burst of other work waits out here
                    block["waited_s"] += wait_quiet(*quiet)
                if block["pressure_before"] is None:
                    block["pressure_before"] = cpu_pressure()
                g = torch.Generator().manual_seed(seed + 1000 * r + n)
                x = geometry.random_stiefel(n, r, dtype=dtype, generator=g).to(device)
                d = adam_direction(n, r, dtype, device, g, steps=adam_steps)
                x_err = float(geometry.orthogonality_error(x))
                for name in RETRACTIONS:
                    for form in FORMS:
                        errs = {}
                        for lr in lrs:
                            errs[lr] = float(geometry.orthogonality_error(retract(form, x, d, lr, name)))
                        t = time_call(lambda: retract(form, x, d, lrs[0], name), device, repeats, warmup)
                        rows.append({"dtype": dname, "r": r, "n": n, "retraction": name, "form": form,
                                     "time_s": t, "err": {f"{lr:g}": e for lr, e in errs.items()},
                                     "input_err": x_err})
                        if progress is not None:
                            progress.update(1)
                now = cpu_pressure()
                if now is not None:
                    block["pressure_max"] = max(now, block["pressure_max"] or 0.0)
            block["pressure_after"] = cpu_pressure()
            if blocks is not None:
                blocks.append(block)
    return rows


# ----------------------------------------------------------------------------- machine load
def cpu_pressure() -> float | None:
    """avg10 % of /proc/pressure/cpu's ``some`` line, None without PSI."""
    p = cpu_pressure_psi()
    return None if p is None else p[0]


def wait_quiet(max_pressure: float, max_wait: float) -> float:
    """Sleep until the CPU pressure of the last 10 s is at most ``max_pressure`` % (at most
    ``max_wait`` s); returns the seconds waited."""
    t0 = time.perf_counter()
    if cpu_pressure() is None or max_wait <= 0:
        return 0.0
    while time.perf_counter() - t0 < max_wait and cpu_pressure() > max_pressure:
        time.sleep(5.0)
    return time.perf_counter() - t0


def markdown(report: dict) -> str:
    rows, lrs = report["rows"], report["lrs"]
    out = [f"Command: `{report['command']}`  ",
           f"Machine: {report['device_name']} ({report['cpus']} CPUs), torch {report['torch']}, "
           f"{report['threads']} thread(s), Python {report['python']}; {report['date']}; wall time "
           f"{report['wall_s']:.0f} s.  ",
           "Machine load (/proc/pressure/cpu 'some' avg10 in %, a shared 2-core machine; before each n "
           f"the script waits idle until it is at most {report['max_pressure']:g} %): " + "; ".join(
               f"{b['dtype']} r={b['r']}: {b['pressure_before']} at the start, at most {b['pressure_max']} "
               f"after an n ({b['waited_s']:.0f} s waited)" for b in report.get("blocks", [])) + ".  ",
           f"Median of {report['repeats']} calls after {report['warmup']} warm-up calls; time at lr "
           f"{lrs[0]:g}. Direction: Adam-normalized (entries ~1), {report['adam_steps']} moment updates. "
           f"`gram` = what the optimizer runs (with its orthonormality correction, drift_tol = "
           f"default by dtype), `gram raw` = the same Gram form without it, `full` = the literal "
           f"`stiefel_kernels.geometry` definition. Errors: `||Y^T Y - I||_F` computed in float64.", ""]
    for dname in report["dtypes"]:
        for r in report["rs"]:
            sub = [x for x in rows if x["dtype"] == dname and x["r"] == r]
            if not sub:
                continue
            ns = sorted({x["n"] for x in sub})
            floor = {x["n"]: x["input_err"] for x in sub}
            out.append(f"### {dname}, r = {r}: time of one retraction (ms)")
            out.append("")
            out.append("| retraction | form | " + " | ".join(f"n={n}" for n in ns) + " |")
            out.append("|---|---|" + "|".join("---:" for _ in ns) + "|")
            for name in RETRACTIONS:
                for form in FORMS:
                    cell = {x["n"]: x for x in sub if x["retraction"] == name and x["form"] == form}
                    out.append(f"| {name} | {form} | " + " | ".join(
                        f"{1e3 * cell[n]['time_s']:.3f}" if n in cell else "–" for n in ns) + " |")
            out.append("")
            for lr in lrs:
                key = f"{lr:g}"
                out.append(f"### {dname}, r = {r}: `||Y^T Y - I||_F` after one step at lr {key}")
                out.append("")
                out.append("| retraction | form | " + " | ".join(f"n={n}" for n in ns) + " |")
                out.append("|---|---|" + "|".join("---:" for _ in ns) + "|")
                out.append("| (input X) | – | " + " | ".join(f"{floor[n]:.1e}" for n in ns) + " |")
                for name in RETRACTIONS:
                    for form in FORMS:
                        cell = {x["n"]: x for x in sub if x["retraction"] == name and x["form"] == form}
                        out.append(f"| {name} | {form} | " + " | ".join(
                            f"{cell[n]['err'][key]:.1e}" if n in cell else "–" for n in ns) + " |")
                out.append("")
    return "\n".join(out)


def plot(report: dict, what: str, path: str) -> None:
    """``what``: ``"time"`` (one row of subplots, one per r, at the first lr) or ``"error"`` (a
    row per learning rate); the first dtype."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    dname = report["dtypes"][0]
    rs = report["rs"]
    lrs = report["lrs"] if what == "error" else report["lrs"][:1]
    fig, axes = plt.subplots(len(lrs), len(rs), figsize=(6.2 * len(rs), 4.4 * len(lrs)), squeeze=False)
    for row, lr in enumerate(lrs):
        for ax, r in zip(axes[row], rs):
            sub = [x for x in report["rows"] if x["dtype"] == dname and x["r"] == r]
            for i, name in enumerate(RETRACTIONS):
                for form in FORMS:
                    pts = sorted((x for x in sub if x["retraction"] == name and x["form"] == form),
                                 key=lambda x: x["n"])
                    if not pts:
                        continue
                    ys = ([1e3 * x["time_s"] for x in pts] if what == "time"
                          else [max(x["err"][f"{lr:g}"], 1e-17) for x in pts])
                    ax.plot([x["n"] for x in pts], ys, color=f"C{i}", ms=4, lw=1.3, **FORM_STYLE[form])
            if what == "error":
                floor = sorted({(x["n"], x["input_err"]) for x in sub})
                ax.plot([f[0] for f in floor], [f[1] for f in floor], color="gray", lw=2.5, alpha=0.5)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("n (rows of the factor)")
            ax.set_ylabel("ms per retraction (median)" if what == "time" else "||Y^T Y - I||_F after one step")
            ax.set_title(f"r = {r}, {dname}, {report['device_name_short']}, lr {lr:g}", fontsize=9)
            ax.grid(True, which="both", alpha=0.25)
    handles = [Line2D([], [], color=f"C{i}", lw=2, label=name) for i, name in enumerate(RETRACTIONS)]
    handles += [Line2D([], [], color="k", label=f"{form}" + {"full": " (geometry)", "gram raw": " (no correction)",
                                                            "gram": " (optimizer)"}[form], **FORM_STYLE[form])
                for form in FORMS]
    if what == "error":
        handles.append(Line2D([], [], color="gray", lw=2.5, alpha=0.5, label="input X"))
    fig.legend(handles=handles, fontsize=8, loc="center right")
    fig.tight_layout(rect=(0, 0, 0.84 if len(rs) > 1 else 0.72, 1))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot written to {path}")


def _ints(s: str) -> list[int]:
    return [int(float(x)) for x in s.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--ns", default=",".join(str(2 ** k) for k in range(8, 17)), help="factor sizes n")
    ap.add_argument("--rs", default="16,64", help="ranks r (one subplot each)")
    ap.add_argument("--lrs", default="1e-3,1e-2", help="learning rates (time at the first)")
    ap.add_argument("--dtypes", default="float32", help="comma list of float32, float64 (plots: the first)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--adam-steps", type=int, default=10, help="Adam moment updates behind the direction")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--max-pressure", type=float, default=5.0,
                    help="wait until /proc/pressure/cpu avg10 is at most this %% before timing")
    ap.add_argument("--max-wait", type=float, default=60.0, help="... for at most this many seconds (each time)")
    ap.add_argument("--out-dir", default="out/retraction_ablation")
    ap.add_argument("--prefix", default="retraction_ablation", help="file name prefix in --out-dir")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="two small sizes, two repeats (tests)")
    ap.add_argument("--replot", default=None, metavar="JSON",
                    help="only redraw the two plots (into --out-dir/--prefix) from an earlier run's JSON")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.replot:
        with open(args.replot) as f:
            report = json.load(f)
        base = os.path.join(args.out_dir, args.prefix)
        plot(report, "time", base + "_time.png")
        plot(report, "error", base + "_error.png")
        return 0
    if args.smoke:
        args.ns, args.rs, args.repeats, args.warmup, args.max_wait = "64,256", "4,16", 2, 1, 0.0
    if args.threads and not args.device.startswith("cuda"):
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    ns, rs = _ints(args.ns), _ints(args.rs)
    lrs = [float(x) for x in args.lrs.split(",") if x.strip()]
    dtypes = [x.strip() for x in args.dtypes.split(",") if x.strip()]
    bad = [d for d in dtypes if d not in DTYPES]
    if bad or not dtypes or not ns or not rs or not lrs:
        raise SystemExit(f"bad --dtypes {bad} (choose from {list(DTYPES)}) or empty --ns/--rs/--lrs")
    quiet = (args.max_pressure, args.max_wait) if device.type == "cpu" and args.max_wait > 0 else None
    before, blocks = cpu_pressure(), []
    total = len(dtypes) * sum(1 for r in rs for n in ns if n >= r) * len(RETRACTIONS) * len(FORMS)
    try:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, desc="retraction ablation", file=sys.stderr)
    except ImportError:
        bar = None
    t0 = time.perf_counter()
    rows = measure(ns, rs, lrs, dtypes, device, args.repeats, args.warmup, args.adam_steps, args.seed, bar,
                   quiet, blocks)
    wall = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    report = {
        "command": " ".join(["python bench/retraction_ablation.py", *(sys.argv[1:] if argv is None else argv)]),
        "device_name": name, "device_name_short": name if device.type == "cuda" else f"CPU, {torch.get_num_threads()} thr",
        "cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
        "threads": torch.get_num_threads() if device.type == "cpu" else "–",
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "wall_s": wall,
        "pressure_before": before, "pressure_after": cpu_pressure(), "blocks": blocks,
        "max_pressure": args.max_pressure,
        "repeats": args.repeats, "warmup": args.warmup, "adam_steps": args.adam_steps,
        "ns": ns, "rs": rs, "lrs": lrs, "dtypes": dtypes, "rows": rows,
    }
    os.makedirs(args.out_dir, exist_ok=True)
    base = os.path.join(args.out_dir, args.prefix)
    text = markdown(report)
    with open(base + ".md", "w") as f:
        f.write("# Retraction ablation: time and orthogonality error against n\n\n" + text + "\n")
    with open(base + ".json", "w") as f:
        json.dump(report, f)
    print(text)
    print(f"table written to {base}.md ({wall:.1f} s)")
    if not args.no_plot:
        plot(report, "time", base + "_time.png")
        plot(report, "error", base + "_error.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

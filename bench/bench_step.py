"""Time ``optimizer.step()`` alone: StiefelAdamW (reference / torch / triton) against fused AdamW.

Cases (Stiefel factor ``A = r x in_features`` (wide, orthonormal rows), ``B = out x r``
Euclidean):

* ``lora7b_r16`` / ``lora7b_r64``: LoRA on a 32-layer 7B-style model; per layer q, k, v, o
  (4096 x 4096), gate, up (11008 x 4096, out x in), down (4096 x 11008).
* ``gpt2_qk``: GPT-2-small factorized attention, 12 layers x 12 heads: ``W_Q`` blocks 768 x 64 on
  the Stiefel manifold (144 tall factors), the matching ``W_K`` blocks Euclidean.

For each case: ``torch.optim.AdamW(fused=True)`` on the same parameters, and
``StiefelAdamW([{"params": A, "stiefel": True}, {"params": B}], lr=1e-3, backend=...)``.
Gradients are fixed; each step is timed alone (CUDA events around ``step()``, warm-up excluded,
median of ``--runs``), and three ways: eager (what a training loop sees), host time alone (the
clock stops when ``step()`` returns, the device idle before), and device time alone (the step
captured once in a CUDA graph and replayed; fused AdamW with ``capturable=True`` there). For the triton backend the Stiefel part is also timed by itself (the
backend's ``step``, and its pass 1 / pass 2 kernels) and its bandwidth is reported against the
floor of docs/design.md ("Memory traffic"): 10 words per element (pass 1 reads p, g, m, v and
writes m, v; pass 2 reads p, m, v and writes p), next to a device-to-device copy bandwidth
measured in the same run.

Usage (needs CUDA)::

    python bench/bench_step.py                       # all cases, writes bench/results/<device>-<date>.{json,md}
    python bench/bench_step.py --cases gpt2_qk --backends torch triton --runs 50
    python -m pytest bench/bench_step.py             # the same cases as pytest-benchmark functions

``--tiny`` shrinks every case (dims / 64, 2 layers) and allows the CPU (Triton interpreter): a
check that the script runs, not a measurement.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

if not torch.cuda.is_available():  # the interpreter is the only way to run the kernels on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import stiefel_kernels  # noqa: E402
from stiefel_kernels.backends import StiefelHyperparams, get_backend, state_dtype  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BACKENDS = ("reference", "torch", "triton")
CASES = ("lora7b_r16", "lora7b_r64", "gpt2_qk")


# ----------------------------------------------------------------------------- cases
@dataclass
class Case:
    name: str
    stiefel_shapes: list[tuple[int, int]]
    euclid_shapes: list[tuple[int, int]]
    note: str


def make_case(name: str, tiny: bool = False) -> Case:
    s = 64 if tiny else 1
    layers = 2 if tiny else None
    if name.startswith("lora7b_r"):
        r = int(name[len("lora7b_r"):])
        r = max(1, r // (4 if tiny else 1))
        hidden, inter = 4096 // s, 11008 // s
        modules = [(hidden, hidden)] * 4 + [(inter, hidden)] * 2 + [(hidden, inter)]  # (out, in)
        n_layers = layers or 32
        a = [(r, fin) for _ in range(n_layers) for (_, fin) in modules]
        b = [(fout, r) for _ in range(n_layers) for (fout, _) in modules]
        return Case(name, a, b, f"LoRA r={r}, {n_layers} layers x (q,k,v,o {hidden}x{hidden}, "
                                f"gate,up {inter}x{hidden}, down {hidden}x{inter}); A (r x in) Stiefel, "
                                "B (out x r) Euclidean")
    if name == "gpt2_qk":
        d_model, d_head = 768 // (8 if tiny else 1), 64 // (4 if tiny else 1)
        n = (layers or 12) * (12 if not tiny else 2)
        return Case(name, [(d_model, d_head)] * n, [(d_model, d_head)] * n,
                    f"GPT-2-small factorized attention: {n} W_Q blocks {d_model}x{d_head} Stiefel "
                    f"(tall), {n} W_K blocks Euclidean")
    raise ValueError(f"unknown case {name!r}; choose from {CASES}")


def make_params(case: Case, device, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = [torch.nn.Parameter(stiefel_kernels.random_stiefel(*s, generator=gen).to(device, dtype))
         for s in case.stiefel_shapes]
    b = [torch.nn.Parameter((0.02 * torch.randn(*s, generator=gen)).to(device, dtype))
         for s in case.euclid_shapes]
    for p in a + b:
        p.grad = (0.01 * torch.randn(*p.shape, generator=gen)).to(device, dtype)
    return a, b


def _elements(shapes) -> int:
    return sum(x * y for x, y in shapes)


# ----------------------------------------------------------------------------- timing
def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn, device, runs: int, warmup: int) -> dict:
    """Median / min / max milliseconds of ``fn()`` over ``runs`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    cuda = torch.device(device).type == "cuda"
    for _ in range(runs):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
            "runs": runs}


def copy_bandwidth(device, nbytes: int = 1 << 30, runs: int = 20) -> float:
    """Device-to-device copy bandwidth in GB/s (read + write counted)."""
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, runs, warmup=3)
    return 2 * n * 4 / (t["median_ms"] * 1e-3) / 1e9


def floor_bytes(case: Case, dtype=torch.float32) -> dict:
    """Bytes the step must move: Stiefel 10 words/element, Euclidean 7 (fused AdamW)."""
    w = torch.tensor([], dtype=dtype).element_size()
    s = 4 if dtype in (torch.float16, torch.bfloat16) else w  # Stiefel states fp32 for half params
    ns, ne = _elements(case.stiefel_shapes), _elements(case.euclid_shapes)
    pass1 = ns * (2 * w + 4 * s)   # read p, g, m, v; write m, v
    pass2 = ns * (2 * w + 2 * s)   # read p, m, v; write p
    return {"stiefel_pass1": pass1, "stiefel_pass2": pass2, "stiefel": pass1 + pass2,
            "euclid_adamw": ne * 7 * w, "adamw_all": (ns + ne) * 7 * w,
            "step": pass1 + pass2 + ne * 7 * w}


# ----------------------------------------------------------------------------- one case
def make_optimizer(kind: str, a, b, retraction: str, euclid: str = "fused", capturable: bool = False):
    """``euclid``: how StiefelAdamW steps the Euclidean group (``fused`` compares like with like
    against fused AdamW; ``default`` is what torch picks, foreach on CUDA). ``capturable``: for
    fused AdamW, its CUDA-graph mode (StiefelAdamW's step is capturable as it is)."""
    if kind == "adamw_fused":
        return torch.optim.AdamW(a + b, lr=1e-3, fused=True, capturable=capturable)
    extra = {"fused": True} if euclid == "fused" else {"foreach": True} if euclid == "foreach" else {}
    return stiefel_kernels.StiefelAdamW([{"params": a, "stiefel": True}, {"params": b, **extra}],
                                        lr=1e-3, backend=kind, retraction=retraction)


def graph_replay_ms(fn, device, runs: int, warmup: int) -> float | str:
    """Device time of ``fn()`` alone: captured once in a CUDA graph (after three warm-up calls
    on a side stream) and replayed, so no host work sits between its kernels. A string says why
    it could not be measured."""
    if torch.device(device).type != "cuda":
        return "no CUDA"
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return time_fn(graph.replay, device, runs, warmup)["median_ms"]
    except Exception as exc:  # noqa: BLE001  (reported in the table, not fatal)
        torch.cuda.synchronize()
        return f"capture failed: {type(exc).__name__}: {str(exc)[:120]}"


def graph_ms(kind: str, case: "Case", device, retraction: str, euclid: str, runs: int,
             warmup: int) -> float | str:
    """Device time of one step (:func:`graph_replay_ms` of ``step()``; fused AdamW in its
    capturable mode)."""
    if torch.device(device).type != "cuda":
        return "no CUDA"
    try:
        a, b = make_params(case, device)
        opt = make_optimizer(kind, a, b, retraction, euclid, capturable=True)
    except Exception as exc:  # noqa: BLE001
        return f"build failed: {type(exc).__name__}: {str(exc)[:120]}"
    return graph_replay_ms(opt.step, device, runs, warmup)


def _sum_ms(total: float | str, part: float | str) -> float | str:
    """Adds per-bucket times; a reason why one could not be measured wins."""
    return total if isinstance(total, str) else part if isinstance(part, str) else total + part


def host_ms(opt, device, runs: int) -> float:
    """Median host time of ``opt.step()`` alone: the device is idle before each call and the
    clock stops when ``step`` returns, so this is the enqueue cost a training loop pays."""
    times = []
    for _ in range(runs):
        _sync(device)
        t0 = time.perf_counter()
        opt.step()
        times.append((time.perf_counter() - t0) * 1e3)
    _sync(device)
    return statistics.median(times)


def bench_triton_passes(a, device, retraction: str, runs: int, warmup: int) -> dict:
    """The triton backend's Stiefel step alone, and its two kernels alone (one bucket each)."""
    from stiefel_kernels.backends import triton_backend as tb

    backend = get_backend("triton")
    hp = StiefelHyperparams(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, amsgrad=False,
                            maximize=False, retraction=retraction, cayley_iters=2, ns_steps=6,
                            drift_tol=1e-6)
    params = [p.detach() for p in a]
    grads = [p.grad for p in a]
    ms = [torch.zeros_like(p, dtype=state_dtype(p)) for p in params]
    vs = [torch.zeros_like(p, dtype=state_dtype(p)) for p in params]
    steps = [torch.tensor(0.0) for _ in params]
    out = {"backend_step": time_fn(lambda: backend.step(params, grads, ms, vs, None, steps, hp),
                                   device, runs, warmup)}
    p1 = p2 = ss = 0.0
    graph = {"pass1": 0.0, "small_step": 0.0, "pass2": 0.0}  # device time, CUDA graph replay
    buckets: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        buckets.setdefault(tuple(p.shape), []).append(i)
    for shape, idx in buckets.items():
        ps = [params[i] for i in idx]
        ptrs = tb.pointer_array([ps, [grads[i] for i in idx], [ms[i] for i in idx],
                                 [vs[i] for i in idx], None], ps[0].device)
        n, r, _, _ = tb._orientation(shape)
        cfg = tb.launch_config(n, r, len(ps), ps[0].device)
        bc = torch.tensor([[0.5] * len(ps), [0.1] * len(ps)], device=device)
        coef = torch.zeros((len(ps), 2, cfg["R_PAD"], cfg["R_PAD"]), device=device)
        parts = {
            "pass1": lambda: tb.pass1(ptrs, shape, ps[0].dtype, grads[idx[0]].dtype, bc, hp, cfg,
                                      len(ps)),
            "small_step": lambda: tb.small_step(grams, hp, cfg["R_PAD"]),
            "pass2": lambda: tb.pass2(ptrs, shape, ps[0].dtype, bc, coef, hp, cfg, len(ps)),
        }
        grams = parts["pass1"]()  # the small step's input: this bucket's Gram matrices
        p1 += time_fn(parts["pass1"], device, runs, warmup)["median_ms"]
        ss += time_fn(parts["small_step"], device, runs, warmup)["median_ms"]
        p2 += time_fn(parts["pass2"], device, runs, warmup)["median_ms"]
        for name, fn in parts.items():
            graph[name] = _sum_ms(graph[name], graph_replay_ms(fn, device, runs, warmup))
        out.setdefault("launch_configs", {})[str(shape)] = cfg
    out["pass1_ms"], out["small_step_ms"], out["pass2_ms"] = p1, ss, p2
    out["graph_ms"] = graph
    return out


def run_case(name: str, backends, device, runs: int, warmup: int, retraction: str, tiny: bool,
             copy_gbs: float | None, euclid: str = "fused") -> dict:
    case = make_case(name, tiny)
    fb = floor_bytes(case)
    res = {"case": name, "note": case.note, "stiefel_elements": _elements(case.stiefel_shapes),
           "euclid_elements": _elements(case.euclid_shapes), "floor_bytes": fb, "steps": {}}
    t_case = time.perf_counter()
    for kind in ("adamw_fused",) + tuple(backends):
        if kind == "adamw_fused" and torch.device(device).type != "cuda":
            continue  # fused AdamW is CUDA-only in practice
        # where a case's wall time goes (a lease that cuts the run short says which part)
        print(f"  {name}: {kind} from {time.perf_counter() - t_case:.1f} s", file=sys.stderr,
              flush=True)
        a, b = make_params(case, device)
        opt = make_optimizer(kind, a, b, retraction, euclid)
        n_runs = max(3, runs // 10) if kind == "reference" else runs
        t = time_fn(opt.step, device, n_runs, warmup)
        t["host_ms"] = host_ms(opt, device, n_runs)
        res["steps"][kind] = t
        del opt, a, b
        if kind != "reference":
            t["graph_ms"] = graph_ms(kind, case, device, retraction, euclid, n_runs, warmup)
    base = res["steps"].get("adamw_fused", {}).get("median_ms")
    for kind, t in res["steps"].items():
        t["ratio_to_adamw_fused"] = (t["median_ms"] / base) if base else None
        t["floor_GBps"] = fb["step" if kind != "adamw_fused" else "adamw_all"] / (t["median_ms"] * 1e-3) / 1e9
    if "triton" in backends:
        print(f"  {name}: triton passes from {time.perf_counter() - t_case:.1f} s",
              file=sys.stderr, flush=True)
        a, _ = make_params(case, device)
        tp = bench_triton_passes(a, device, retraction, runs, warmup)
        tp["pass1_GBps"] = fb["stiefel_pass1"] / (tp["pass1_ms"] * 1e-3) / 1e9
        tp["pass2_GBps"] = fb["stiefel_pass2"] / (tp["pass2_ms"] * 1e-3) / 1e9
        tp["stiefel_step_GBps"] = fb["stiefel"] / (tp["backend_step"]["median_ms"] * 1e-3) / 1e9
        if copy_gbs:
            for key in ("pass1", "pass2", "stiefel_step"):
                tp[f"{key}_fraction_of_copy_bw"] = tp[f"{key}_GBps"] / copy_gbs
        res["triton_passes"] = tp
    return res


# ----------------------------------------------------------------------------- report
def environment(device) -> dict:
    import triton

    dev = torch.device(device)
    return {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(),
            "date": _dt.datetime.now().isoformat(timespec="seconds")}


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# optimizer.step() on {env['device']}", "",
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, {env['date']}; "
             f"retraction {report['retraction']}, Euclidean group {report.get('euclid', 'fused')}, "
             f"median of {report['runs']} runs"
             + (", TINY shapes (not a measurement)" if report["tiny"] else ""), "",
             f"device-to-device copy: {report['copy_GBps']:.0f} GB/s" if report["copy_GBps"] else "", ""]
    for res in report["cases"]:
        fb = res["floor_bytes"]
        lines += [f"## {res['case']}", "", res["note"], "",
                  f"bytes a step must move: {fb['step'] / 1e6:.1f} MB (fused AdamW on the same "
                  f"parameters: {fb['adamw_all'] / 1e6:.1f} MB)", "",
                  "| optimizer | ms/step (eager) | x fused AdamW | GB/s at the floor | host ms (enqueue) "
                  "| device ms (graph replay) | x fused AdamW (graph) |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        base_graph = res["steps"].get("adamw_fused", {}).get("graph_ms")
        for kind, t in res["steps"].items():
            ratio = f"{t['ratio_to_adamw_fused']:.2f}" if t["ratio_to_adamw_fused"] else "-"
            host = f"{t['host_ms']:.3f}" if "host_ms" in t else "-"
            g = t.get("graph_ms", "-")
            graph = f"{g:.3f}" if isinstance(g, float) else str(g)
            gratio = (f"{g / base_graph:.2f}" if isinstance(g, float) and isinstance(base_graph, float)
                      else "-")
            lines.append(f"| {kind} | {t['median_ms']:.3f} | {ratio} | {t['floor_GBps']:.1f} | {host} "
                         f"| {graph} | {gratio} |")
        tp = res.get("triton_passes")
        if tp:
            frac = (lambda k: f" ({tp[k + '_fraction_of_copy_bw']:.0%} of copy)"
                    if f"{k}_fraction_of_copy_bw" in tp else "")
            lines += ["", f"triton Stiefel part alone: step {tp['backend_step']['median_ms']:.3f} ms, "
                          f"{tp['stiefel_step_GBps']:.1f} GB/s{frac('stiefel_step')}; "
                          f"pass 1 {tp['pass1_ms']:.3f} ms, {tp['pass1_GBps']:.1f} GB/s{frac('pass1')}; "
                          f"pass 2 {tp['pass2_ms']:.3f} ms, {tp['pass2_GBps']:.1f} GB/s{frac('pass2')}"
                          + (f"; small step {tp['small_step_ms']:.3f} ms" if "small_step_ms" in tp
                             else "") + " (eager: the host in the loop)"]
            g = tp.get("graph_ms")
            if g:
                fmt = (lambda v: f"{v:.3f} ms" if isinstance(v, float) else str(v))
                lines += ["", "device time per part (CUDA graph replay, summed over buckets): "
                              + ", ".join(f"{k.replace('_', ' ')} {fmt(v)}" for k, v in g.items())]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    ap.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--retraction", default="cayley_fp")
    ap.add_argument("--euclid", default="fused", choices=("fused", "foreach", "default"),
                    help="how StiefelAdamW steps the Euclidean (B) group")
    ap.add_argument("--tiny", action="store_true", help="small shapes; allows CPU (interpreter)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="directory for the .json/.md result")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)

    if torch.cuda.is_available():
        device = "cuda"
    elif args.tiny:
        device = "cpu"
    else:
        print("bench_step.py: no CUDA device; these timings need a GPU. Use --tiny to check that "
              "the script runs on CPU (Triton interpreter), without meaningful numbers.",
              file=sys.stderr)
        return 2
    copy_gbs = copy_bandwidth(device) if device == "cuda" else None
    report = {"environment": environment(device), "retraction": args.retraction, "runs": args.runs,
              "tiny": args.tiny, "euclid": args.euclid if device == "cuda" else "default", "copy_GBps": copy_gbs, "cases": []}
    tag = "".join(c if c.isalnum() else "-" for c in report["environment"]["device"])
    stem = args.out / f"{tag}-{_dt.datetime.now():%Y%m%d-%H%M%S}{'-tiny' if args.tiny else ''}"
    for name in args.cases:
        t0 = time.perf_counter()
        res = run_case(name, args.backends, device, args.runs, args.warmup, args.retraction,
                       args.tiny, copy_gbs, report["euclid"])
        res["bench_seconds"] = round(time.perf_counter() - t0, 1)
        report["cases"].append(res)
        print(markdown({**report, "cases": [res]}), flush=True)
        print(f"({name}: {res['bench_seconds']} s)", flush=True)
        if not args.no_save:  # after every case: a lease that ends mid-run keeps what finished
            args.out.mkdir(parents=True, exist_ok=True)
            stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
            stem.with_suffix(".md").write_text(markdown(report))
    if not args.no_save:
        print(f"wrote {stem}.json and .md")
    return 0


# ----------------------------------------------------------------------------- pytest-benchmark
try:
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

if pytest is not None:
    _needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="timings need a CUDA device")

    @_needs_cuda
    @pytest.mark.parametrize("kind", ("adamw_fused",) + BACKENDS[1:])
    @pytest.mark.parametrize("case", CASES)
    def test_step(benchmark, case, kind):
        a, b = make_params(make_case(case), "cuda")
        opt = make_optimizer(kind, a, b, "cayley_fp")
        for _ in range(3):
            opt.step()

        def step():
            opt.step()
            torch.cuda.synchronize()

        torch.cuda.synchronize()
        benchmark.pedantic(step, rounds=50, warmup_rounds=2)


if __name__ == "__main__":
    sys.exit(main())

"""Kernel report: every Triton kernel of the fast path, compiled ahead of time for sm_90 in every
configuration the launchers can ask for, with its registers, spills, shared memory and the
vector width of its global loads and stores.

No GPU is needed. The launch configurations are not restated here: for every rank
``1..MAX_RANK`` (and ``1..SMALL_STEP_MAX_RANK`` for the small step), parameter and gradient
dtype, AMSGrad, maximize, orientation, dot precision and alignment, this script asks the
launchers' own argument builders (:func:`stiefel_kernels.kernels.launch.pass1_launch`,
:func:`~stiefel_kernels.kernels.launch.pass2_launch`,
:func:`~stiefel_kernels.kernels.launch.small_step_args`, with :func:`launch_config` choosing the
tiles) what they would launch, lets Triton's own argument binder decide the specialization
(signature, constexprs, alignment attributes) for ``GPUTarget("cuda", 90, 32)``, and compiles
each distinct specialization once (configurations that differ only in runtime values share a
compile). Registers and spills come from ``ptxas -v`` (Triton's bundled ptxas, the flags Triton
uses) on the compiled PTX; compiling without a GPU leaves Triton's ``n_spills`` unset.

Usage::

    python bench/kernel_report.py                 # markdown table on stdout
    python bench/kernel_report.py --check         # exit 1 on a spill or shared memory over the limit
    python bench/kernel_report.py --json out.json --jobs 2

``--check`` is what ``tests/test_kernel_report.py`` runs. Compiles are cached by Triton
(``TRITON_CACHE_DIR``) and the ptxas results by the hash of the PTX, next to it.
"""
from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU target, not the interpreter
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default (3.9 warns when unset)

import argparse  # noqa: E402
import concurrent.futures  # noqa: E402
import hashlib  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from stiefel_kernels.backends import StiefelHyperparams  # noqa: E402
from stiefel_kernels.backends import triton_backend  # noqa: E402
from stiefel_kernels.kernels import launch  # noqa: E402
from stiefel_kernels.kernels import small_step_triton, stiefel_adamw_triton  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
#: shared memory one block may use on H100 / H200 (sm_90: 227 KB)
H100_MAX_SHARED = 232448
#: the SM count launch_config fills (H100 SXM)
SM_COUNT = 132
DOT_PRECISIONS = ("ieee", "tf32x3")
DTYPES = (torch.float32, torch.bfloat16)
#: long sides sampled (launch_config may pick tiles by n and the factor count as well as rank)
N_SAMPLES = (768, 4096, 4095, 11008)
F_SAMPLES = (1, 8, 144, 1024)

KERNELS = {
    "stiefel_pass1_kernel": stiefel_adamw_triton.stiefel_pass1_kernel,
    "stiefel_pass2_kernel": stiefel_adamw_triton.stiefel_pass2_kernel,
    "small_step_kernel": small_step_triton.small_step_kernel,
}


# ----------------------------------------------------------------------------- enumeration
def _hp(amsgrad: bool, maximize: bool, retraction: str = "cayley_fp") -> StiefelHyperparams:
    return StiefelHyperparams(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, amsgrad=amsgrad,
                              maximize=maximize, retraction=retraction, cayley_iters=2,
                              ns_steps=6, drift_tol=1e-6)


def _ptrs(num: int, aligned: bool) -> torch.Tensor:
    arr = torch.zeros((5, num), dtype=torch.int64)
    setattr(arr, launch._ALIGN_ATTR, aligned)
    return arr


def _pass_launches(max_rank: int):
    """``(kernel name, what, grid, args, kwargs)`` of every pass-1 / pass-2 launch."""
    scratch = torch.empty(16, dtype=torch.float32)  # partials / coef: only the address matters
    seen = set()
    for r in range(1, max_rank + 1):
        for n in N_SAMPLES:
            if n < r:
                continue
            for num, dot in itertools.product(F_SAMPLES, DOT_PRECISIONS):
                cfg = launch.launch_config(n, r, num, torch.device("cpu"), sm_count=SM_COUNT,
                                           dot_precision=dot)
                # factor counts that change only the grid and the runtime chunk length: once
                tiles = (r, n, dot) + tuple(v for k, v in sorted(cfg.items())
                                            if k not in ("num_chunks", "rows_per_chunk"))
                if tiles in seen:
                    continue
                seen.add(tiles)
                bc = torch.ones((2, num), dtype=torch.float32)
                for shape, orient in (((n, r), "tall"), ((r, n), "wide")):
                    if n == r and orient == "wide":
                        continue
                    for aligned in (True, False):
                        ptrs = _ptrs(num, aligned)
                        if True:
                            for p_dt in DTYPES:
                                for amsgrad in (False, True):
                                    what = dict(r=r, n=n, F=num, orient=orient, p=str(p_dt)[6:],
                                                amsgrad=amsgrad, dot=dot, aligned=aligned)
                                    for g_dt in DTYPES:
                                        for maximize in (False, True):
                                            grid, args, kw = launch.pass1_launch(
                                                ptrs, shape, p_dt, g_dt, bc, _hp(amsgrad, maximize),
                                                cfg, num, scratch, dot_precision=dot)
                                            yield ("stiefel_pass1_kernel",
                                                   dict(what, g=str(g_dt)[6:], maximize=maximize),
                                                   grid, args, kw)
                                    grid, args, kw = launch.pass2_launch(
                                        ptrs, shape, p_dt, bc, scratch, _hp(amsgrad, False), cfg,
                                        num, dot_precision=dot)
                                    yield "stiefel_pass2_kernel", what, grid, args, kw


def _small_step_launches(max_rank: int):
    num = 2
    for r in range(1, max_rank + 1):
        r_pad = max(16, launch.next_pow2(r))
        k = torch.zeros((num, 3, r, r), dtype=torch.float32)  # K, G, H as slices, as the backend
        for store in ("compact", "padded"):
            if store == "compact":
                c = torch.zeros((num, r, r), dtype=torch.float32)
                e = torch.zeros((num, r, r), dtype=torch.float32)
            else:
                coef = torch.zeros((num, 2, r_pad, r_pad), dtype=torch.float32)
                c, e = coef[:, 0], coef[:, 1]
            for retraction in launch.SMALL_STEP_TRITON:
                grid, args, kw = launch.small_step_args(
                    k[:, 0], k[:, 1], k[:, 2], c, e, 1e-3, retraction, tol=1e-6, r_pad=r_pad,
                    c_minus_i=store == "padded")
                yield "small_step_kernel", dict(r=r, store=store, retraction=retraction), grid, args, kw


def specializations(max_rank: int, small_max_rank: int):
    """Distinct compiles: ``{key: job}``, each job listing the configurations it serves."""
    backend = make_backend(TARGET)
    binders = {name: create_function_from_signature(k.signature, k.params, backend)
               for name, k in KERNELS.items()}
    jobs: dict[str, dict] = {}
    packed = {}
    launches = list(_pass_launches(max_rank)) + list(_small_step_launches(small_max_rank))
    for name, what, grid, args, kwargs in launches:
        kernel = KERNELS[name]
        bound, spec, options = binders[name](*args, **kwargs)
        pkey = repr((name, spec, sorted(options.items())))
        if pkey not in packed:  # the specialization fixes what _pack_args returns
            packed[pkey] = kernel._pack_args(backend, dict(kwargs), bound, spec, options)
        options, signature, constexprs, attrs = packed[pkey]
        opts = {"num_warps": options.num_warps, "num_stages": options.num_stages}
        const = {kernel.arg_names[k[0]]: v for k, v in constexprs.items()}
        key = repr((name, sorted(signature.items()), sorted((k, str(v)) for k, v in const.items()),
                    sorted((k, str(v)) for k, v in attrs.items()), sorted(opts.items())))
        job = jobs.get(key)
        if job is None:
            job = jobs[key] = dict(kernel=name, signature=signature,
                                   constexprs={k: v for k, v in constexprs.items()},
                                   attrs=attrs, options=opts, const=const, serves=[])
        job["serves"].append(what)
    return jobs


# ----------------------------------------------------------------------------- compile, measure
def ptxas_path() -> str:
    from triton.backends.nvidia.compiler import get_ptxas
    return get_ptxas(TARGET.arch).path


def ptxas_version() -> str:
    out = subprocess.run([ptxas_path(), "--version"], capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1]


def _cache_dir() -> Path:
    base = os.environ.get("TRITON_CACHE_DIR") or os.path.join(Path.home(), ".triton", "cache")
    d = Path(base) / "stiefel_kernels_report"
    d.mkdir(parents=True, exist_ok=True)
    return d


_PTXAS_RE = {
    "regs": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_st": re.compile(r"(\d+) bytes spill stores"),
    "spill_ld": re.compile(r"(\d+) bytes spill loads"),
}


def run_ptxas(ptx: str, arch: str) -> dict:
    """``ptxas -v`` with the flags Triton's ``make_cubin`` uses; cached by the PTX's hash."""
    tool = ptxas_path()
    key = hashlib.sha256((ptx + arch + tool).encode()).hexdigest()
    cached = _cache_dir() / f"{key}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        Path(src).write_text(ptx)
        res = subprocess.run([tool, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}",
                              src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed:\n{res.stderr[-3000:]}")
    log = res.stdout + res.stderr
    out = {k: int(m.group(1)) if (m := rx.search(log)) else 0 for k, rx in _PTXAS_RE.items()}
    cached.write_text(json.dumps(out))
    return out


_LD = re.compile(r"^\s*(?:@!?%p\d+\s+)?ld\.global((?:\.[\w]+)*)", re.M)
_ST = re.compile(r"^\s*(?:@!?%p\d+\s+)?st\.global((?:\.[\w]+)*)", re.M)
_CP = re.compile(r"^\s*(?:@!?%p\d+\s+)?cp\.async\.(?:ca|cg)\.shared\.global(?:\.[\w]+)*\s+"
                 r"\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-fA-F]+|\d+)", re.M)


def _widths(matches) -> dict:
    out = {"v4": 0, "v2": 0, "s": 0}
    for suffix in matches:
        out["v4" if ".v4" in suffix else "v2" if ".v2" in suffix else "s"] += 1
    return out


def vector_widths(ptx: str) -> dict:
    """Counts of global loads / stores in the PTX by vector width (``v4``, ``v2``, scalar ``s``)
    and of ``cp.async`` global-to-shared copies by bytes (16, 8, 4)."""
    cp = {16: 0, 8: 0, 4: 0}
    for m in _CP.finditer(ptx):
        cp[int(m.group(1), 0)] = cp.get(int(m.group(1), 0), 0) + 1
    return {"ld": _widths(_LD.findall(ptx)), "st": _widths(_ST.findall(ptx)), "cp": cp}


def compile_job(job: dict) -> dict:
    from triton.backends.nvidia.compiler import sm_arch_from_capability
    kernel = KERNELS[job["kernel"]]
    t0 = time.perf_counter()
    src = ASTSource(kernel, job["signature"], job["constexprs"], job["attrs"])
    ck = triton.compile(src, target=TARGET, options=job["options"])
    ptx = ck.asm["ptx"]
    res = run_ptxas(ptx, sm_arch_from_capability(TARGET.arch))
    res.update(shared=ck.metadata.shared, seconds=time.perf_counter() - t0, **vector_widths(ptx))
    return res


# ----------------------------------------------------------------------------- report
def _config(job: dict) -> str:
    c, o = job["const"], job["options"]
    if job["kernel"] == "small_step_kernel":
        ret = {v: k for k, v in launch.SMALL_STEP_TRITON.items()}[c["RETRACTION"]]
        return f"R{c['R_PAD']} BK{c['BK']} w{o['num_warps']} {ret}"
    dts = str(c["P_DT"]).replace("fp32", "f32").replace("bf16", "bf16")
    if "G_DT" in c:
        dts += "/" + str(c["G_DT"]).replace("fp32", "f32")
    return (f"R{c['R_PAD']} N{c['BLOCK_N']} w{o['num_warps']} s{o['num_stages']} {dts} "
            f"{'wide' if c['WIDE'] else 'tall'} {c['DOT_PREC']} A{c['ALIGNED']}")


def _ranks(job: dict) -> str:
    rs = sorted({w["r"] for w in job["serves"]})
    return f"{rs[0]}-{rs[-1]}" if len(rs) > 1 else str(rs[0])


def _fmt_w(d: dict) -> str:
    return f"{d['v4']}/{d['v2']}/{d['s']}"


def collect(jobs: int, max_rank: int | None = None, small_max_rank: int | None = None,
            only: str | None = None):
    max_rank = triton_backend.MAX_RANK if max_rank is None else max_rank
    small_max_rank = launch.SMALL_STEP_MAX_RANK if small_max_rank is None else small_max_rank
    specs = list(specializations(max_rank, small_max_rank).values())
    if only:
        specs = [j for j in specs if re.search(only, f"{j['kernel']} {_config(j)}")]
    # the slowest (largest tiles) first, so the pool's tail is short
    specs.sort(key=lambda j: -j["const"]["R_PAD"])
    if jobs > 1:
        with concurrent.futures.ProcessPoolExecutor(jobs) as pool:
            results = list(pool.map(compile_job, specs))
    else:
        results = [compile_job(j) for j in specs]
    rows = []
    for job, res in zip(specs, results):
        rows.append(dict(kernel=job["kernel"], config=_config(job), ranks=_ranks(job),
                         launches=len(job["serves"]),
                         amsgrad=sorted({w.get("amsgrad", False) for w in job["serves"]}),
                         maximize=sorted({w.get("maximize", False) for w in job["serves"]}),
                         R_PAD=job["const"]["R_PAD"], ALIGNED=job["const"].get("ALIGNED", 0),
                         **res))
    order = {k: i for i, k in enumerate(KERNELS)}
    rows.sort(key=lambda row: (order[row["kernel"]], row["R_PAD"], row["config"]))
    return rows, dict(max_rank=max_rank, small_max_rank=small_max_rank)


def problems(rows) -> list[str]:
    out = []
    for row in rows:
        where = f"{row['kernel']} {row['config']}"
        if row["spill_st"] or row["spill_ld"]:
            out.append(f"{where}: spills {row['spill_st']}/{row['spill_ld']} B")
        if row["shared"] > H100_MAX_SHARED:
            out.append(f"{where}: {row['shared']} B shared > {H100_MAX_SHARED}")
    return out


def markdown(rows, meta) -> str:
    lines = [
        f"Targets `GPUTarget(\"cuda\", 90, 32)` (sm_90a), Triton {triton.__version__}, "
        f"torch {torch.__version__}, ptxas: {ptxas_version()} (Triton's bundled ptxas; "
        f"flags `-lineinfo -v --regAllocOptLevel=2`). Ranks 1-{meta['max_rank']} for the passes "
        f"(`MAX_RANK`), 1-{meta['small_max_rank']} for the small step (`SMALL_STEP_MAX_RANK`); "
        f"launch configs from `launch_config(n, r, F, sm_count={SM_COUNT})` for n in "
        f"{list(N_SAMPLES)} and F in {list(F_SAMPLES)}.",
        "",
        "Config: `R` R_PAD, `N` BLOCK_N, `w` warps, `s` stages, param/grad dtype, orientation, "
        "dot precision of G/H and pass 2, `A` the ALIGNED constexpr (elements per 16 B; 0: "
        "unaligned bucket). `launches`: launcher calls (rank x n x F x AMSGrad x maximize ... "
        "samples) served by this one compile. Loads / stores: global `ld` and `st` counted in "
        "the PTX as v4 / v2 / scalar, `cp.async` global-to-shared copies as 16 / 8 / 4 bytes.",
        "",
        "| kernel | config | ranks | launches | regs | spill st/ld (B) | stack (B) | shared (B) "
        "| ld v4/v2/s | cp.async 16/8/4 | st v4/v2/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cp = row["cp"]
        lines.append(
            f"| {row['kernel'].replace('_kernel', '')} | {row['config']} | {row['ranks']} "
            f"| {row['launches']} | {row['regs']} | {row['spill_st']}/{row['spill_ld']} "
            f"| {row['stack']} | {row['shared']} | {_fmt_w(row['ld'])} "
            f"| {cp.get(16, 0)}/{cp.get(8, 0)}/{cp.get(4, 0)} | {_fmt_w(row['st'])} |")
    lines.append("")
    summary = {}
    for row in rows:
        s = summary.setdefault(row["kernel"], dict(regs=0, spill=0, shared=0, n=0))
        s["regs"] = max(s["regs"], row["regs"])
        s["spill"] = max(s["spill"], row["spill_st"] + row["spill_ld"])
        s["shared"] = max(s["shared"], row["shared"])
        s["n"] += 1
    lines.append("| kernel | compiles | max regs | max spill (B) | max shared (B) |")
    lines.append("|---|---|---|---|---|")
    for k, s in summary.items():
        lines.append(f"| {k} | {s['n']} | {s['regs']} | {s['spill']} | {s['shared']} |")
    bad = problems(rows)
    lines += ["", "Problems: " + ("; ".join(bad) if bad else "none (0 spill bytes, shared memory "
                                  f"under {H100_MAX_SHARED} B everywhere).")]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--check", action="store_true",
                    help="exit 1 when a configuration spills or needs too much shared memory")
    ap.add_argument("--json", help="also write the rows as JSON to this file")
    ap.add_argument("--max-rank", type=int, help="ranks of the passes (default MAX_RANK)")
    ap.add_argument("--small-max-rank", type=int, help="ranks of the small step")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows, meta = collect(args.jobs, args.max_rank, args.small_max_rank)
    print(markdown(rows, meta))
    print(f"\n{len(rows)} compiles in {time.perf_counter() - t0:.1f} s with {args.jobs} jobs",
          file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1, default=str))
    return 1 if args.check and problems(rows) else 0


if __name__ == "__main__":
    sys.exit(main())

"""Time the native CPU passes (stiefel_kernels.cpu_fused) against the torch backend's formulation.

Not a test. For each config and thread count, medians over ``--rounds`` of:

* ``torch pass 1``: the torch backend's moments (``_foreach_lerp_/mul_/addcmul_``), stacking,
  ``D`` and ``gram.gram_pass`` (as in ``backends/torch_backend.py``);
* ``torch pass 2``: ``gram.apply_coefficients`` and the ``_foreach_copy_`` back (with the
  transposes of a wide factor);
* ``native pass 1`` / ``native pass 2``: ``cpu_fused.pass1`` / ``cpu_fused.pass2``;
* ``r x r``: ``gram.step_coefficients`` (cayley_fp) on the same Gram matrices, for scale;
* ``torch backend step``: ``backends.torch_backend.step`` (the whole step as it is now);
* ``native step``: ``cpu_fused.pass1`` + ``gram.step_coefficients`` + ``cpu_fused.pass2``;
* ``fused AdamW``: ``torch.optim.AdamW(fused=True).step()`` on the same parameters, for scale.

    python bench/bench_cpu_passes.py                 # LoRA r=16 and GPT-2 QK, 1 and 2 threads
    python bench/bench_cpu_passes.py --rounds 31 --threads 1
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from stiefel_kernels import cpu_fused, geometry, gram
from stiefel_kernels.backends import StiefelHyperparams, bias_corrections, get_backend

CONFIGS = {
    "lora_r16": ("LoRA r=16: 64 factors 16 x 4096", (16, 4096), 64),
    "gpt2_qk": ("GPT-2 QK: 144 factors 768 x 64", (768, 64), 144),
}
HP = StiefelHyperparams(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, amsgrad=False,
                        maximize=False, retraction="cayley_fp", cayley_iters=2, ns_steps=6,
                        drift_tol=1e-6)


def make(shape, count, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = geometry.is_row_orthonormal(shape)
    col = (shape[1], shape[0]) if rows else shape
    ps = []
    for _ in range(count):
        q = torch.linalg.qr(torch.randn(col, generator=g))[0]
        ps.append((q.mT if rows else q).contiguous().to(dtype))
    gs = [torch.randn(shape, generator=g).to(dtype) * 1e-2 for _ in range(count)]
    ms = [torch.zeros(shape) for _ in range(count)]
    vs = [torch.zeros(shape) for _ in range(count)]
    return ps, gs, ms, vs


def torch_pass1(ps, gs, ms, vs, bc1, bc2, rows):
    work = torch.float32
    gs = [g.to(work) for g in gs]
    torch._foreach_lerp_(ms, gs, 1 - HP.beta1)
    torch._foreach_mul_(vs, HP.beta2)
    torch._foreach_addcmul_(vs, gs, gs, 1 - HP.beta2)
    m = torch.stack(ms)
    shape = (-1, 1, 1)
    d = (m / torch.tensor(bc1).view(shape)) / (torch.stack(vs).sqrt() / torch.tensor(bc2).view(shape) + HP.eps)
    x = torch.stack(ps).to(work)
    x, d = (x.mT, d.mT) if rows else (x, d)
    return x, d, gram.gram_pass(x, d)


def torch_pass2(ps, x, d, c, e, rows):
    y = gram.apply_coefficients(x, d, c, e)
    stored = y.mT if rows else y
    torch._foreach_copy_(ps, list(stored.to(ps[0].dtype).unbind(0)))


def median_ms(fn, rounds, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def run(name, threads, rounds, dtype):
    label, shape, count = CONFIGS[name]
    torch.set_num_threads(threads)
    rows = geometry.is_row_orthonormal(shape)
    ps, gs, ms, vs = make(shape, count, dtype)
    steps = [torch.tensor(5.0) for _ in ps]
    bc1, bc2 = bias_corrections(steps, HP.beta1, HP.beta2)
    bc = cpu_fused.bias_correction_tensor(bc1, bc2)
    x, d, (k, g, h) = torch_pass1(ps, gs, ms, vs, bc1, bc2, rows)
    c, e, _ = gram.step_coefficients(k, g, h, HP.lr, HP.retraction, tol=HP.drift_tol)
    res = {}
    res["torch pass 1"] = median_ms(lambda: torch_pass1(ps, gs, ms, vs, bc1, bc2, rows), rounds)
    res["torch pass 2"] = median_ms(lambda: torch_pass2(ps, x, d, c, e, rows), rounds)
    res["native pass 1"] = median_ms(lambda: cpu_fused.pass1(ps, gs, ms, vs, None, bc, HP), rounds)
    res["native pass 2"] = median_ms(lambda: cpu_fused.pass2(ps, ms, vs, bc, c, e, HP), rounds)
    res["r x r (cayley_fp)"] = median_ms(
        lambda: gram.step_coefficients(k, g, h, HP.lr, HP.retraction, tol=HP.drift_tol), rounds)
    backend = get_backend("torch")
    res["torch backend step"] = median_ms(
        lambda: backend.step(ps, gs, ms, vs, None, steps, HP), rounds)

    def native_step():
        grams = cpu_fused.pass1(ps, gs, ms, vs, None, bc, HP)
        kk, gg, hh = grams.unbind(-3)
        cc, ee, _ = gram.step_coefficients(kk, gg, hh, HP.lr, HP.retraction, tol=HP.drift_tol)
        cpu_fused.pass2(ps, ms, vs, bc, cc, ee, HP)
    res["native step"] = median_ms(native_step, rounds)
    params = [p.clone().requires_grad_() for p in ps]
    for p, gr in zip(params, gs):
        p.grad = gr.clone()
    if dtype != torch.float64:
        opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
        res["fused AdamW (same params)"] = median_ms(opt.step, rounds)
    return label, res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS))
    ap.add_argument("--threads", nargs="*", type=int, default=[1, 2])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, native passes available: {cpu_fused.available()}, "
          f"params {args.dtype}, medians of {args.rounds} rounds (ms)\n")
    print("| config | threads | torch pass 1 | native pass 1 | speed-up | torch pass 2 | native pass 2 "
          "| speed-up | r x r (cayley_fp) | torch backend step | native step | fused AdamW (same params) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.configs:
        for threads in args.threads:
            label, res = run(name, threads, args.rounds, dtype)
            t1, n1 = res["torch pass 1"], res["native pass 1"]
            t2, n2 = res["torch pass 2"], res["native pass 2"]
            adamw = res.get("fused AdamW (same params)", float("nan"))
            print(f"| {label} | {threads} | {t1:.2f} | {n1:.2f} | {t1 / n1:.1f}x | {t2:.2f} | {n2:.2f} "
                  f"| {t2 / n2:.1f}x | {res['r x r (cayley_fp)']:.2f} | {res['torch backend step']:.2f} "
                  f"| {res['native step']:.2f} | {adamw:.2f} |", flush=True)


if __name__ == "__main__":
    main()

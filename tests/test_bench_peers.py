"""``bench/bench_peers.py --interleave``: the optimizers of a config timed in turns, with paired
ratios (a benchmark's bookkeeping, not a timing: nothing here asserts a speed)."""
import torch
from _recipes import load_bench


def test_interleaved_rounds_and_paired_ratios(monkeypatch):
    bp = load_bench("bench_peers")
    cfg = bp.make_config("factors_512x8x64")
    data = bp.pristine(cfg, "cpu")
    order = []
    build = bp.build

    def counting_build(kind, cfg, data):
        stepper = build(kind, cfg, data)
        step = stepper.step

        def counted():
            order.append(kind)
            step()
        stepper.step = counted
        return stepper

    monkeypatch.setattr(bp, "build", counting_build)
    rounds, warmup = 4, 2
    kinds = ["adamw_fused", "stiefel_torch", "adamw_foreach"]
    res = bp.time_interleaved(kinds, cfg, data, "cpu", rounds, warmup, max_step_s=60.0)

    assert set(res) == set(kinds)
    for kind in kinds:
        r = res[kind]
        assert "skip" not in r, r
        assert r["rounds"] == rounds and 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"]
        assert r["paired_ratio"] > 0 and r["state_bytes"] > 0
    assert res["adamw_fused"]["paired_ratio"] == 1.0  # each round's baseline over itself
    # StiefelAdamW's bytes include the per-bucket buffers it keeps between steps (its workspace)
    assert res["stiefel_torch"]["state_bytes"] > res["adamw_fused"]["state_bytes"]
    # warm-up (first step + warmup - 1) per kind, in order, then the rounds in turns, each round
    # starting one optimizer later
    timed = order[len(kinds) * warmup:]
    assert order[:len(kinds) * warmup] == [k for k in kinds for _ in range(warmup)]
    assert timed == [kinds[(i + j) % len(kinds)] for i in range(rounds) for j in range(len(kinds))]


def test_interleaved_reports_a_skip_and_times_the_rest(monkeypatch):
    bp = load_bench("bench_peers")
    cfg = bp.make_config("factors_512x8x64")
    data = bp.pristine(cfg, "cpu")
    monkeypatch.setattr(bp, "why_not", lambda kind, cfg, device: "not here" if kind == "adamw_foreach" else None)
    res = bp.time_interleaved(["adamw_fused", "adamw_foreach", "stiefel_torch"], cfg, data, "cpu", 2, 1, 60.0)
    assert res["adamw_foreach"] == {"skip": "not here"}
    assert res["stiefel_torch"]["rounds"] == 2 and res["adamw_fused"]["paired_ratio"] == 1.0
    text = bp.markdown({"environment": bp.environment("cpu") | {"load_start": (0.0, 0.0, 0.0)},
                        "rounds": 2, "warmup": 1, "max_pressure": 5.0, "max_wait": 1.0,
                        "interleave": True, "threads": [torch.get_num_threads()],
                        "configs": ["factors_512x8x64"],
                        "optimizers": ["adamw_fused", "adamw_foreach", "stiefel_torch"],
                        "results": [{"config": "factors_512x8x64", "note": cfg.case.note,
                                     "threads": torch.get_num_threads(), "load": (0.0, 0.0, 0.0),
                                     "waited_s": 0.0, "pressure_before": None, "steps": res}]})
    assert "median of the per-round ratios" in text and "not here" in text

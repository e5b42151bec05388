"""``bench/bench_step.py``'s bookkeeping (the GPU timings themselves need a GPU): per-bucket
device times summed, a part that could not be captured reported by name, the report's lines."""
from _recipes import load_bench


def test_per_bucket_times_add_up_and_a_failure_wins():
    bs = load_bench("bench_step")
    assert bs._sum_ms(0.0, 1.5) == 1.5 and bs._sum_ms(1.5, 0.25) == 1.75
    assert bs._sum_ms(1.5, "capture failed: X") == "capture failed: X"
    assert bs._sum_ms("capture failed: X", 2.0) == "capture failed: X"
    assert bs.graph_replay_ms(lambda: None, "cpu", 3, 1) == "no CUDA"


def test_report_lists_eager_and_graph_times_of_the_parts():
    bs = load_bench("bench_step")
    step = {"median_ms": 2.0, "ratio_to_adamw_fused": None, "floor_GBps": 1.0, "host_ms": 1.0,
            "graph_ms": 0.5}
    tp = {"backend_step": {"median_ms": 1.0}, "stiefel_step_GBps": 10.0, "pass1_ms": 0.25,
          "pass1_GBps": 20.0, "pass2_ms": 0.125, "pass2_GBps": 30.0, "small_step_ms": 0.5,
          "graph_ms": {"pass1": 0.2, "small_step": "capture failed: E", "pass2": 0.1}}
    report = {"environment": {"device": "d", "torch": "t", "triton": "tr", "cuda": "c",
                              "date": "now"},
              "retraction": "cayley_fp", "runs": 3, "tiny": True, "copy_GBps": None,
              "cases": [{"case": "gpt2_qk", "note": "n", "steps": {"triton": step},
                         "floor_bytes": {"step": 1e6, "adamw_all": 1e6},
                         "triton_passes": tp}]}
    text = bs.markdown(report)
    assert "small step 0.500 ms (eager: the host in the loop)" in text
    assert ("device time per part (CUDA graph replay, summed over buckets): pass1 0.200 ms, "
            "small step capture failed: E, pass2 0.100 ms") in text

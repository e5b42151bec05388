"""The shared bucketing rule (stiefel_kernels._buckets): keys, order of buckets and factors, runs,
and the working dtype."""
import torch

from stiefel_kernels import _buckets, backends, riemannian
from stiefel_kernels._buckets import BucketKey, bucket_key, buckets, group, runs, working_dtype

CPU = torch.device("cpu")


def _params():
    f32, f64, bf16 = torch.float32, torch.float64, torch.bfloat16
    return [torch.zeros(8, 3, dtype=f32),      # 0
            torch.zeros(3, 8, dtype=f32),      # 1: wide twin of 0
            torch.zeros(8, 3, dtype=f64),      # 2
            torch.zeros(2, 8, 3, dtype=f32),   # 3: a stack
            torch.zeros(8, 3, dtype=f32),      # 4
            torch.zeros(8, 3, dtype=bf16),     # 5
            torch.zeros(3, 8, dtype=f32)]      # 6


def test_key_fields():
    p = torch.zeros(3, 8, dtype=torch.bfloat16)
    assert bucket_key(p) == BucketKey((3, 8), torch.bfloat16, CPU, None, None)
    assert bucket_key(p, column_form=True).shape == (8, 3)
    assert bucket_key(torch.zeros(2, 3, 8), column_form=True).shape == (2, 8, 3)
    assert bucket_key(torch.zeros(8, 8), column_form=True).shape == (8, 8)
    k = bucket_key(p, torch.zeros(3, 8), layout="L")
    assert (k.grad_dtype, k.layout, k.device) == (torch.float32, "L", CPU)
    assert isinstance(k.shape, tuple) and hash(k) == hash(bucket_key(p, torch.zeros(3, 8), layout="L"))


def test_buckets_in_order_of_first_factor_and_factors_in_list_order():
    ps = _params()
    b = buckets(ps)
    assert list(b.values()) == [[0, 4], [1, 6], [2], [3], [5]]
    assert list(b)[0] == BucketKey((8, 3), torch.float32, CPU)
    # column form: the wide factors join the tall ones of the same dtype
    assert list(buckets(ps, column_form=True).values()) == [[0, 1, 4, 6], [2], [3], [5]]
    # the gradient dtype splits a bucket
    gs = [torch.zeros_like(p, dtype=torch.bfloat16 if i == 4 else torch.float32) for i, p in enumerate(ps)]
    assert list(buckets(ps, gs).values()) == [[0], [1, 6], [2], [3], [4], [5]]


def test_group_and_runs():
    assert group(["a", None, "a", ("x", 1), None]) == {"a": [0, 2], None: [1, 4], ("x", 1): [3]}
    ps = _params()
    order = [i for idx in buckets(ps).values() for i in idx]
    ordered = [ps[i] for i in order]
    assert runs(ordered) == [(0, 2), (2, 4), (4, 5), (5, 6), (6, 7)]
    assert runs([]) == []
    gs = [torch.zeros_like(p) for p in ordered]
    gs[1] = gs[1].bfloat16()  # equal params, different gradient dtype: two runs
    assert runs(ordered, gs)[:2] == [(0, 1), (1, 2)]


def test_working_dtype_is_the_one_rule():
    for dt, want in [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                     (torch.float32, torch.float32), (torch.float64, torch.float64)]:
        assert working_dtype(dt) == want and working_dtype(torch.zeros(1, dtype=dt)) == want
    assert backends.state_dtype is _buckets.working_dtype
    assert riemannian.working_dtype is _buckets.working_dtype


def test_advance_steps_on_runs_of_one_buffer():
    """``advance_steps`` adds one to exactly the counters it is given, whether they are a run of
    consecutive elements of one buffer (one add on the slice, whose values it returns), the
    whole buffer, or anything else (a per-counter add)."""
    from stiefel_kernels.backends import advance_steps

    buf = torch.arange(6, dtype=torch.float32)
    views = [buf[i] for i in range(6)]
    out = advance_steps(views[1:4])  # a bucket: a slice of the group's buffer
    assert out.tolist() == [2.0, 3.0, 4.0]
    assert buf.tolist() == [0.0, 2.0, 3.0, 4.0, 4.0, 5.0]
    assert advance_steps(views).tolist() == [1.0, 3.0, 4.0, 5.0, 5.0, 6.0]
    out = advance_steps([views[0], views[2], views[5]])  # not consecutive
    assert out.tolist() == [2.0, 5.0, 7.0]
    assert buf.tolist() == [2.0, 3.0, 5.0, 5.0, 5.0, 7.0]
    out = advance_steps([views[3], views[2]])  # consecutive, but in the other order
    assert out.tolist() == [6.0, 6.0] and buf.tolist() == [2.0, 3.0, 6.0, 6.0, 5.0, 7.0]
    out = advance_steps([views[5], views[1], views[5]])  # a counter given twice: added twice
    assert out.tolist() == [9.0, 4.0, 9.0] and buf.tolist() == [2.0, 4.0, 6.0, 6.0, 5.0, 9.0]
    own = [torch.tensor(1.0), torch.tensor(7.0)]
    assert advance_steps(own).tolist() == [2.0, 8.0] and [t.item() for t in own] == [2.0, 8.0]

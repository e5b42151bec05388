"""``StiefelAdamW.orthogonality_error()``: the largest ``||X^T X - I||_F`` of the points the last
step started from, read off the step's own Gram matrix, per backend; and the failure count as a
device tensor. Tolerances: tests/README.md (float32 Gram sums)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from stiefel_kernels import StiefelAdamW  # noqa: E402
from stiefel_kernels.backends import available_backends  # noqa: E402
from stiefel_kernels.geometry import orthogonality_error, random_stiefel  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("backend", available_backends())
def test_orthogonality_error_reports_the_input_of_the_last_step(gen, backend):
    shapes = [(4, 60), (4, 60), (50, 3), (2, 5, 40)]
    ps = [torch.nn.Parameter(random_stiefel(*s, generator=gen).to(DEVICE)) for s in shapes]
    opt = StiefelAdamW([{"params": ps, "stiefel": True}], lr=1e-2, backend=backend)
    assert opt.orthogonality_error() is None
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen).to(DEVICE)
    opt.step()
    first = opt.orthogonality_error()
    assert first is not None and first.dim() == 0 and first.device.type == DEVICE
    assert float(first) < 1e-5
    with torch.no_grad():  # drift one factor by a known amount before the next step
        ps[2].mul_(1 + 1e-3)
    want = max(float(orthogonality_error(p.detach()).max()) for p in ps)  # float64
    assert want > 1e-3
    opt.step()
    got = float(opt.orthogonality_error())
    assert abs(got - want) <= 1e-5 * want + 1e-6
    count = opt.retraction_failure_count()  # None where a backend counts nothing (reference)
    assert (count is None or (count.device.type == DEVICE and int(count) == 0))
    assert opt.retraction_failures == 0

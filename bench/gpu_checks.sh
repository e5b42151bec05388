#!/usr/bin/env bash
# The checks a session with a GPU owes this project (issues 3 and 5), in one command:
#   bash bench/gpu_checks.sh OUT_DIR
# 1. builds stiefel_kernels._C with its CUDA kernels (needs a CUDA build of torch and nvcc);
# 2. the whole test suite on the GPU (Triton compiled, native-op tests on CPU and CUDA), and the
#    Triton backend's tests (which step CUDA factors) again with the native CUDA small-matrix
#    kernels forced on for the r x r step;
# 3. bench_smallmat on the GPU (native vs torch.linalg vs Newton–Schulz) and bench_step
#    (StiefelAdamW vs fused AdamW). Logs and tables go to OUT_DIR; copy the tables worth keeping
#    into bench/results/ with the device name, and set smallmat.NATIVE_CUDA_DEFAULT from them.
set -euo pipefail
out=${1:?usage: bash bench/gpu_checks.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" | tee "$out/device.txt"
pip install --no-build-isolation -e ".[test]" > "$out/build.log" 2>&1
python -c "from stiefel_kernels import _C, _native; assert _C.with_cuda and _native.has_op('solve', 'cuda'), 'built without CUDA'"
status=0
python -m pytest tests -q -x > "$out/tests.log" 2>&1 || status=1
STIEFEL_KERNELS_SMALLMAT=native python -m pytest tests/test_triton_backend.py -q -x \
  > "$out/tests-native-cuda.log" 2>&1 || status=1
python bench/bench_smallmat.py --device cuda --dtype float32 > "$out/smallmat-cuda-float32.md" 2>&1 || status=1
python bench/bench_step.py --out "$out" > "$out/bench_step.log" 2>&1 || status=1
tail -n 3 "$out"/tests*.log
exit $status

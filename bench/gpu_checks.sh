#!/usr/bin/env bash
# The checks a session with a GPU owes this project (issues 3 and 5), in one command:
#   bash bench/gpu_checks.sh OUT_DIR
# For the GPU machines as they are set up: torch (a CUDA build) and Triton preinstalled, nvcc, no
# package registry. Nothing is downloaded: the package is installed with --no-deps, and a test
# whose packages are missing is skipped (peft/transformers/safetensors: importorskip) or left out
# (numpy: tests/test_block_kernels.py); OUT_DIR/env.txt says what was there.
# 1. builds stiefel_kernels._C with its CUDA kernels (needs a CUDA build of torch, nvcc and a C++
#    compiler; TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0+PTX", which includes sm_90 for
#    H100/H200);
# 2. the whole test suite on the GPU (Triton compiled, native-op tests on CPU and CUDA), and the
#    Triton backend's tests (which step CUDA factors) again with the native CUDA small-matrix
#    kernels enabled for the r x r step (STIEFEL_KERNELS_CUDA_KERNELS=1);
# 3. bench_smallmat on the GPU (native vs torch.linalg vs Newton–Schulz) and bench_step
#    (StiefelAdamW vs fused AdamW). Logs and tables go to OUT_DIR; copy the tables worth keeping
#    into bench/results/ with the device name, and decide from them whether the native CUDA
#    kernels become the default on CUDA.
set -euo pipefail
out=${1:?usage: bash bench/gpu_checks.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(), torch.cuda.get_device_capability())" | tee "$out/device.txt"
python - > "$out/env.txt" <<'EOF'
import importlib.util, shutil, sys
print("python", sys.version.split()[0], sys.executable)
for tool in ("nvcc", "c++", "ninja", "cmake"):
    print(f"{tool}: {shutil.which(tool)}")
for mod in ("setuptools", "wheel", "pytest", "pytest_benchmark", "numpy", "triton", "matplotlib",
            "tqdm", "peft", "transformers", "safetensors"):
    print(f"{mod}: {'yes' if importlib.util.find_spec(mod) else 'MISSING'}")
EOF
cat "$out/env.txt"
if ! python -m pip install -v --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1; then
  tail -n 40 "$out/build.log"; echo "build failed: $out/build.log" >&2; exit 1
fi
grep -E "stiefel_kernels: |gencode" "$out/build.log" | sort -u | cut -c1-300 || true
python -c "from stiefel_kernels import _C, _native; assert _C.with_cuda, 'built without CUDA (see the stiefel_kernels: lines of build.log)'; _native.enable_cuda_kernels(); assert _native.has_op('solve', 'cuda')"
status=0
if ! python -c "import pytest" 2>/dev/null; then
  echo "pytest is missing: tests and bench_smallmat not run" | tee "$out/tests.log"
  status=1
else
  ignore=()
  python -c "import numpy" 2>/dev/null || ignore+=(--ignore=tests/test_block_kernels.py)
  python -m pytest tests -q -x -rs ${ignore[@]+"${ignore[@]}"} > "$out/tests.log" 2>&1 || status=1
  STIEFEL_KERNELS_CUDA_KERNELS=1 python -m pytest tests/test_triton_backend.py -q -x \
    > "$out/tests-native-cuda.log" 2>&1 || status=1
  python bench/bench_smallmat.py --device cuda --dtype float32 > "$out/smallmat-cuda-float32.md" 2>&1 || status=1
fi
python bench/bench_step.py --out "$out" > "$out/bench_step.log" 2>&1 || status=1
tail -n 3 "$out"/tests*.log
exit $status

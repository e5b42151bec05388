#!/usr/bin/env bash
# Builds stiefel_kernels._C with its CUDA kernels against a CUDA build of torch, on a machine
# with nvcc and no GPU, the way the GPU machines install it, and checks the result:
#
#   bash tools/check_cuda_torch_build.sh WORK_DIR [TORCH_SPEC]
#
# 1. a virtual environment WORK_DIR/venv with TORCH_SPEC (default torch==2.11.0, whose PyPI wheel
#    is built with CUDA 13.0: the GPU machines' torch) and what pip installs with it (the nvidia-*
#    wheels, several GB) and setuptools as new as torch allows (pyproject.toml's build-system asks
#    for a recent one), nothing else: no cmake, ninja, pybind11 or wheel in the venv (a ninja on
#    PATH is used; NO_NINJA=1 below hides it);
# 2. a copy of this working tree in WORK_DIR/src (the editable install writes _C there, not here),
#    built with `pip install --no-build-isolation --no-deps -e .` (log: WORK_DIR/build.log);
# 3. checks: nvcc compiled for sm_90 (and sm_80, PTX for newer GPUs) unless TORCH_CUDA_ARCH_LIST
#    says otherwise; the module imports under the CUDA torch with with_cuda set, and a CPU and (once
#    enable_cuda_kernels() has registered them) a CUDA kernel for every op; a CPU kernel agrees
#    with torch.linalg. (Running the CUDA kernels needs a GPU: bench/gpu_checks.sh.)
#
# Environment: NO_NINJA=1 hides ninja from the build (setuptools then compiles one file after the
# other, as on a machine without ninja); CUDA_HOME / TORCH_CUDA_ARCH_LIST / MAX_JOBS are passed on
# to setup.py; PYTHON picks the interpreter for the venv (default python3).
set -euo pipefail
work=${1:?usage: bash tools/check_cuda_torch_build.sh WORK_DIR [TORCH_SPEC]}
spec=${2:-torch==2.11.0}
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$work"
work=$(cd "$work" && pwd)

if [ ! -x "$work/venv/bin/python" ]; then "${PYTHON:-python3}" -m venv "$work/venv"; fi
py="$work/venv/bin/python"
"$py" -m pip install -q --upgrade "$spec" setuptools
"$py" - <<'EOF'
import importlib.util, torch
assert torch.version.cuda, f"torch {torch.__version__} is not a CUDA build"
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}); present:",
      {m: importlib.util.find_spec(m) is not None
       for m in ("setuptools", "wheel", "ninja", "cmake", "pybind11", "triton")})
EOF

rm -rf "$work/src"
mkdir -p "$work/src"
(cd "$repo" && git ls-files -z --cached --others --exclude-standard \
   | tar --null -T - --ignore-failed-read -cf -) | tar -xf - -C "$work/src"

path=$PATH
if [ "${NO_NINJA:-0}" = 1 ]; then
  mkdir -p "$work/no-ninja"
  printf '#!/bin/sh\nexit 1\n' > "$work/no-ninja/ninja"  # cpp_extension's `ninja --version` fails
  chmod +x "$work/no-ninja/ninja"
  path="$work/no-ninja:$PATH"
fi
echo "building in $work/src (log: $work/build.log)"
start=$(date +%s)
(cd "$work/src" && PATH="$path" "$py" -m pip install -v --no-build-isolation --no-deps -e .) \
  > "$work/build.log" 2>&1 || { tail -n 60 "$work/build.log"; echo "BUILD FAILED" >&2; exit 1; }
echo "built in $(( $(date +%s) - start )) s"
grep -E "stiefel_kernels: |Falling back|nvcc .*smallmat_cuda" "$work/build.log" | sort -u | cut -c1-400
arch=${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX}
if [ "$arch" = "8.0;9.0+PTX" ]; then
  for flag in arch=compute_90,code=sm_90 arch=compute_80,code=sm_80 arch=compute_90,code=compute_90; do
    grep -q -- "-gencode=$flag" "$work/build.log" || { echo "nvcc was not given -gencode=$flag" >&2; exit 1; }
  done
fi

cd "$work"  # import the copy's package, not this checkout's
"$py" - "$work/src" <<'EOF'
import sys
sys.path.insert(0, sys.argv[1])
import torch
import stiefel_kernels
from stiefel_kernels import _C, _native
assert _C.__file__.startswith(sys.argv[1]), _C.__file__
assert _C.with_cuda, "_C was built without its CUDA kernels"
_native.enable_cuda_kernels()  # registers them with the dispatcher (opt-in, see _native)
for op in _C.ops:
    assert _native.has_op(op, "cpu") and _native.has_op(op, "cuda"), op
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"stiefel_kernels::{op}", "CUDA"), op
a = torch.randn(4, 8, 8, dtype=torch.float64)
spd = a @ a.mT + 8 * torch.eye(8, dtype=torch.float64)
x, info = torch.ops.stiefel_kernels.solve(spd, a)
assert int(info.abs().sum()) == 0 and torch.allclose(x, torch.linalg.solve(spd, a))
print(f"OK: {_C.__file__} imports under torch {torch.__version__} with CUDA kernels for {_C.ops}"
      f" (GPU present: {torch.cuda.is_available()})")
EOF

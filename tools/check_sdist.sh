#!/usr/bin/env bash
# Build the sdist, install it into a fresh venv without build isolation, and check the result:
# the sdist holds every file the native build reads, stiefel_kernels._C imports from the
# installed package and runs an op, and the installed version is the one of stiefel_kernels/_version.py.
#
#   tools/check_sdist.sh [WORKDIR]        (default WORKDIR: .ci-sdist in the repository, git-ignored)
#
# Environment: PYTHON (default python3); TORCH_REQ, the torch to install first (default torch==2.13.0,
# the README's); STIEFEL_KERNELS_WITH_CUDA etc. pass on to setup.py.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mkdir -p "${1:-$repo/.ci-sdist}" && cd "${1:-$repo/.ci-sdist}" && pwd)
python=${PYTHON:-python3}
torch_req=${TORCH_REQ:-torch==2.13.0}

rm -rf "$work/venv" "$work/dist" "$work/src"
"$python" -m venv "$work/venv"
# shellcheck disable=SC1091
source "$work/venv/bin/activate"
python -m pip install -q --upgrade pip
# torch first, then the build requirements (those of the README's install command, and `build`),
# then build the sdist and install it against that torch.
python -m pip install -q "$torch_req"
python -m pip install -q ninja setuptools wheel build
# Built from a copy of the tree's files (tracked, and untracked but not ignored), as a fresh clone
# has them: a stale stiefel_kernels.egg-info/SOURCES.txt in the checkout would add its files to
# the sdist and hide a missing MANIFEST.in rule.
rm -rf "$work/src"
mkdir -p "$work/src"
(cd "$repo" && git ls-files -z --cached --others --exclude-standard \
   | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
   | tar --null -T - -cf -) | tar -C "$work/src" -xf -
echo "+ python -m build --sdist --no-isolation (a copy of $repo)"
python -m build --sdist --no-isolation -o "$work/dist" "$work/src" > "$work/build-sdist.log" 2>&1 \
  || { cat "$work/build-sdist.log"; exit 1; }
sdist=$(ls "$work"/dist/stiefel_kernels-*.tar.gz)
echo "sdist: $(basename "$sdist")"

# Every file of the native build is in the sdist (CUDA sources too: they are not compiled
# here, so only this check covers them).
build_files=$(cd "$work/src" && ls -d CMakeLists.txt LICENSE setup.py pyproject.toml MANIFEST.in stiefel_kernels/_elf.py \
              $(find csrc -type f | sort))
# shellcheck disable=SC2086
python - "$sdist" $build_files <<'PY'
import sys, tarfile
with tarfile.open(sys.argv[1]) as tar:
    names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
wanted = sys.argv[2:]
assert any(w.startswith("csrc/") for w in wanted), wanted
missing = [w for w in wanted if w not in names]
if missing:
    sys.exit(f"missing from the sdist: {missing}")
print(f"sdist holds all {len(wanted)} build files (csrc/, CMakeLists.txt, LICENSE, ...)")
PY

echo "+ pip install --no-build-isolation $(basename "$sdist")"
python -m pip install -q --no-build-isolation "$sdist"

want=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$repo/stiefel_kernels/_version.py")
cd "$work"  # not the repository: import the installed package
python - "$want" "$work/venv" <<'PY'
import importlib.metadata, os, sys
import torch
import stiefel_kernels, stiefel_kernels._C
want, venv = sys.argv[1], os.path.realpath(sys.argv[2])
where = os.path.realpath(stiefel_kernels._C.__file__)
assert where.startswith(venv + os.sep), f"stiefel_kernels._C imported from {where}, not the venv"
got = {"stiefel_kernels.__version__": stiefel_kernels.__version__,
       "distribution metadata": importlib.metadata.version("stiefel_kernels")}
assert all(v == want for v in got.values()), f"version {got}, _version.py says {want}"
a = torch.eye(3, dtype=torch.float64) * 2
x, info = torch.ops.stiefel_kernels.solve(a, torch.ones(3, 1, dtype=torch.float64))
assert int(info) == 0 and torch.allclose(x, torch.full((3, 1), 0.5, dtype=torch.float64)), (x, info)
print(f"installed from the sdist: stiefel_kernels {want}, native extension {os.path.basename(where)} "
      f"(torch {torch.__version__}): ok")
PY

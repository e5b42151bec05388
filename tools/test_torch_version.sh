#!/usr/bin/env bash
# Run the test suite against one torch release, CPU only, in a scratch virtual environment.
#
#   tools/test_torch_version.sh VERSION [PYTEST ARGS...]      e.g. tools/test_torch_version.sh 2.7.0
#
# Used to find (and re-check) the torch floor declared in pyproject.toml. What it does:
#   1. copies the working tree (tracked and untracked, not ignored files; or the commit
#      STIEFEL_TEST_REF) to a scratch directory, so the checkout's own build is left alone;
#   2. makes a venv there and resolves torch==VERSION together with the build requirements and the
#      project's [test] extra (read from pyproject.toml; the project itself is left out of the
#      resolution so versions below the declared floor can be tried), with `pip --dry-run --report`;
#   3. installs that set with --no-deps, first without the nvidia-*/cuda-* wheels (several GB), and
#      adds them only if torch does not import without them (the PyPI Linux torch wheels tried,
#      2.7 to 2.13, load the CUDA runtime libraries at import, even on a machine without a GPU);
#   4. builds the package with `pip install --no-build-isolation --no-deps -e .` and runs
#      `python -m pytest tests -q` (or the PYTEST ARGS given).
#
# Environment:
#   PYTHON=python3.11                the interpreter for the venv (default: python3)
#   STIEFEL_TEST_WORKDIR=DIR         where to work (default: a new temporary directory; kept)
#   STIEFEL_TEST_REF=HEAD            test this commit instead of the working tree
#   STIEFEL_TEST_REUSE_VENV=1        keep the venv of an earlier run in STIEFEL_TEST_WORKDIR when
#                                    it was made for the same requirements
#   STIEFEL_KERNELS_SKIP_NATIVE=1    build without the native extension (passed on to setup.py)
#   STIEFEL_KERNELS_WITH_CUDA=0      the default here: CPU kernels only (PyPI's torch is a CUDA
#                                    build; a CUDA toolkit on the machine need not match it)
#   EXTRAS=test                      which optional-dependency groups of pyproject.toml to install
#   EXTRA_PINS="numpy<2.4"           extra requirements for the resolution: torch <= 2.11 pins a
#                                    Triton (<= 3.6) whose interpreter (TRITON_INTERPRET=1, the
#                                    CPU tests) fails with NumPy >= 2.4, so pass this for them
# The log of each stage is printed; the exit status is pytest's (or the failing stage's).
set -euo pipefail

if [ $# -lt 1 ]; then
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  exit 2
fi
version=$1
shift
repo=$(cd "$(dirname "$0")/.." && pwd)
export STIEFEL_KERNELS_WITH_CUDA=${STIEFEL_KERNELS_WITH_CUDA:-0}
python=${PYTHON:-python3}
extras=${EXTRAS:-test}
work=${STIEFEL_TEST_WORKDIR:-$(mktemp -d "${TMPDIR:-/tmp}/stiefel-torch-$version.XXXXXX")}
mkdir -p "$work"
echo "== torch $version: working in $work"

# 1. a copy of the working tree (or of the commit STIEFEL_TEST_REF)
rm -rf "$work/src"
mkdir -p "$work/src"
if [ -n "${STIEFEL_TEST_REF:-}" ]; then
  git -C "$repo" archive --format=tar "$STIEFEL_TEST_REF" | tar -C "$work/src" -xf -
  echo "== testing commit $(git -C "$repo" rev-parse --short "$STIEFEL_TEST_REF")"
else
  (cd "$repo" && git ls-files -z --cached --others --exclude-standard \
     | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
     | tar --null -T - -cf -) | tar -C "$work/src" -xf -
  echo "== testing the working tree of $repo"
fi

# 2. the venv and the resolution
new_venv() {
  rm -rf "$work/venv"
  "$python" -m venv "$work/venv"
  # shellcheck disable=SC1091
  source "$work/venv/bin/activate"
  python -m pip install -q --upgrade pip
  python -c 'import tomllib' 2>/dev/null || python -m pip install -q tomli
}
if [ -n "${STIEFEL_TEST_REUSE_VENV:-}" ] && [ -f "$work/venv/installed.in" ]; then
  # shellcheck disable=SC1091
  source "$work/venv/bin/activate"
else
  new_venv
fi
reqs=$(cd "$work/src" && python - "$extras" <<'EOF'
import sys
try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib
meta = tomllib.load(open("pyproject.toml", "rb"))
req = list(meta["build-system"]["requires"])
groups = meta["project"].get("optional-dependencies", {})
for extra in filter(None, sys.argv[1].split(",")):
    req += groups[extra]
req += [r for r in meta["project"].get("dependencies", []) if not r.startswith("torch")]
print("\n".join(req))
EOF
)
# shellcheck disable=SC2086
printf '%s\n' "torch==$version" $reqs ${EXTRA_PINS:-} > "$work/requirements.in"
if [ -f "$work/venv/installed.in" ] && cmp -s "$work/venv/installed.in" "$work/requirements.in"; then
  echo "== reusing $work/venv (STIEFEL_TEST_REUSE_VENV, same requirements)"
else
  if [ -f "$work/venv/installed.in" ]; then new_venv; fi  # a kept venv of other requirements
  echo "== resolving: $(tr '\n' ' ' < "$work/requirements.in")"
  python -m pip install -q --dry-run --ignore-installed --report "$work/resolved.json" \
    -r "$work/requirements.in"
  python - "$work/resolved.json" "$work/pins.txt" "$work/pins-cuda.txt" <<'EOF'
import json, re, sys
items = json.load(open(sys.argv[1]))["install"]
keep, dropped = [], []
for it in items:
    name, ver = it["metadata"]["name"], it["metadata"]["version"]
    (dropped if re.match(r"(nvidia|cuda)[-_]", name.lower()) else keep).append(f"{name}=={ver}")
open(sys.argv[2], "w").write("\n".join(sorted(keep)) + "\n")
open(sys.argv[3], "w").write("\n".join(sorted(dropped)) + "\n")
print("== resolved:", " ".join(sorted(keep)))
print("== CUDA runtime wheels (installed only if torch needs them to import):",
      " ".join(sorted(dropped)) or "none")
EOF

  # 3. install without dependency resolution; the CUDA runtime wheels only if torch needs them
  #    to import (PyPI's Linux torch wheels link libcudart, cuBLAS, ... at import, even on CPU)
  python -m pip install -q --no-deps -r "$work/pins.txt"
  if ! python -c 'import torch' 2>/dev/null; then
    echo "== torch $version does not import without its CUDA runtime wheels: installing them"
    python -m pip install -q --no-deps -r "$work/pins-cuda.txt"
  fi
  cp "$work/requirements.in" "$work/venv/installed.in"
fi
python -c 'import torch; torch.ones(2) @ torch.ones(2); print("== import torch:", torch.__version__, "cuda available:", torch.cuda.is_available())'

# 4. build and test
cd "$work/src"
echo "== building (STIEFEL_KERNELS_SKIP_NATIVE=${STIEFEL_KERNELS_SKIP_NATIVE:-}" \
     "STIEFEL_KERNELS_WITH_CUDA=$STIEFEL_KERNELS_WITH_CUDA)"
python -m pip install -q --no-deps --no-build-isolation -e .
python -c "import stiefel_kernels, stiefel_kernels._native as n; print('== stiefel_kernels', stiefel_kernels.__version__, 'native extension:', n.available)"
echo "== python -m pytest ${*:-tests -q}"
set +e
if [ $# -gt 0 ]; then python -m pytest "$@"; else python -m pytest tests -q; fi
rc=$?
set -e
echo "== torch $version: pytest exit status $rc (work dir $work)"
exit $rc

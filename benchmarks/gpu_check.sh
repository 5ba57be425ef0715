#!/usr/bin/env bash
# The GPU check of issue 14 in one run: the `cuda` tests, then the GPU benchmarks, one table.
#
#   bash benchmarks/gpu_check.sh --fetch-wheels   # here, with network: lightning's wheel -> .whl/
#   bash benchmarks/gpu_check.sh                  # on the bare GPU machine (python3 holds torch)
#   bash benchmarks/gpu_check.sh --cpu-dry-run    # anywhere: cuda tests skip, benchmarks tiny
#
# On the GPU machine nothing can be downloaded. Its image has torch, torchvision, timm,
# torchmetrics, tensorboard, scikit-learn, pytest and pytest-timeout; the lightning wheel this
# project is tested with travels in .whl/ (carry it) and is installed into /tmp/site, and the
# package itself is imported from the working tree (PYTHONPATH), so nothing is built there.
# Output: the log and the table also go to $OUT (or /tmp/gpu_check_out) as gpu_check.log/.md.
# A partial rerun: TESTS_K='fsdp' (pytest -k; TESTS_K=none skips the tests), PARTS='stack'
# (any of snapshot,mixup,stack; PARTS=none skips the benchmarks).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LIGHTNING_VERSION=2.6.6
mode=${1:-}

if [ "$mode" = "--fetch-wheels" ]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    exec "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux2014_x86_64 --platform any \
        -d .whl "lightning==$LIGHTNING_VERSION"
fi

out=${OUT:-/tmp/gpu_check_out}
mkdir -p "$out"
exec > >(tee "$out/gpu_check.log") 2>&1
start=$SECONDS

if ls .whl/*.whl > /dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

"$PY" - <<'EOF' || exit 1
import importlib, sys
import torch, lightning
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, lightning {lightning.__version__}")
for name in ("torchvision", "timm", "torchmetrics", "tensorboard", "sklearn", "pytest", "pytest_timeout"):
    module = importlib.import_module(name)
    print(f"  {name} {getattr(module, '__version__', '?')}")
if torch.cuda.is_available():
    print(f"  GPU: {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}")
major, minor = (int(p) for p in lightning.__version__.split(".")[:2])
if not (2, 4) <= (major, minor) < (2, 7):
    sys.exit(f"lightning {lightning.__version__} is outside >=2.4,<2.7: carry .whl (--fetch-wheels)")
EOF

echo "== pytest tests/test_cuda.py tests/test_sam_cuda.py ($((SECONDS - start)) s)"
# --timeout guards a hung collective (FSDP)
tests=0
if [ "${TESTS_K:-}" != none ]; then
    "$PY" -m pytest tests/test_cuda.py tests/test_sam_cuda.py -q -rs --timeout=240 --junitxml="$out/test_cuda.xml" \
        ${TESTS_K:+-k "$TESTS_K"}
    tests=$?
fi

echo "== benchmarks ($((SECONDS - start)) s)"
bench=0
parts=${PARTS:-snapshot,mixup,stack}
if [ "$parts" != none ]; then
    dry=()
    [ "$mode" = "--cpu-dry-run" ] && dry=(--cpu-dry-run)
    "$PY" benchmarks/gpu_check.py "${dry[@]}" --parts "$parts" --table "$out/gpu_check.md"
    bench=$?
fi

echo "== done in $((SECONDS - start)) s: tests exit $tests, benchmarks exit $bench"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]

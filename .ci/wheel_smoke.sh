#!/usr/bin/env bash
# Install visearch from a wheel into a fresh venv (not editable, not the source tree) and run the CLI pipeline
# convert -> extract -> query -> eval on the demo photos from a directory outside the checkout: catches files the
# code reads that the wheel does not ship (model configs, the weights manifest).
# Usage: .ci/wheel_smoke.sh [PYTHON]   (PYTHON builds the wheel and the photo set; default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=$PWD
PY=${1:-$SRC/.venv/bin/python}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/visearch-wheel.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
# build from a copy, so the checkout gets no build/ or *.egg-info
mkdir "$WORK/src"
cp -r "$SRC/pyproject.toml" "$SRC/README.md" "$SRC/visearch" "$WORK/src/"
"$PY" -m pip wheel -q --no-deps -w "$WORK/dist" "$WORK/src"
python3 -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -q "$WORK"/dist/visearch-*.whl
"$PY" benchmarks/make_demo.py "$WORK/demo" >/dev/null
cd "$WORK"   # nothing below can see the source tree
V="$WORK/venv/bin/visearch"
export VISEARCH_DATA_DIR="$WORK/data" VISEARCH_WEIGHTS_DIR="$WORK/weights"
"$WORK/venv/bin/python" -c 'import sys, visearch; assert "site-packages" in visearch.__file__, visearch.__file__'
models=$("$V" models)            # (no pipe into grep -q: an early close would fail the command under pipefail)
grep -qx "superglobal-r101" <<<"$models"
listed=$("$V" weights list)
grep -q "CVPR2022_CVNet_R101.pyth" <<<"$listed"
"$V" convert demo/photos --name demo --ground-truth demo/ground_truth.json --quiet
"$V" extract demo --model lite --quiet
# the wheel's plain install has no ray: --engine ray says so in one line and fails
if noray=$("$V" extract demo --engine ray --quiet 2>&1); then echo "extract --engine ray without ray succeeded" >&2; exit 1; fi
[ "$noray" = "error: ray is not installed: --engine ray needs the ray extra: pip install 'visearch[ray]'" ] \
  || { echo "unexpected output of --engine ray without ray: $noray" >&2; exit 1; }
found=$("$V" query demo/photos/queries/coffee-crop.jpg --dataset demo --top-k 1 --paths --quiet)
grep -q "objects/coffee.jpg" <<<"$found"
"$V" eval demo --model lite --json --quiet | "$WORK/venv/bin/python" -c '
import json, sys
r = json.load(sys.stdin)
assert r["medium"]["map"] > 90, r
print("wheel smoke test: eval medium mAP", r["medium"]["map"])'

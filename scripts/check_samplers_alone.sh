#!/usr/bin/env bash
# qllm_samplers must install and pass its own tests with torch alone (+ transformers for the tiny test models):
# build it into a fresh virtualenv, without qllm_evals or qllm_model, and run tests/samplers against the install.
# (numpy arrives with transformers; that the library itself never imports it is checked by tests/packaging.)
set -euo pipefail
cd "$(dirname "$0")/.."
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT   # the venv (about 1 GB with torch) and the copies go when the check ends
venv="${QLLM_SAMPLERS_VENV:-$scratch/venv}"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -c constraints.txt torch
# Build from a copy, so that no build/ folder is left in the source tree.
src="$scratch/samplers"
cp -r packages/samplers "$src"
"$venv/bin/python" -m pip install -q -c constraints.txt "$src[test]"
for other in qllm_evals qllm_model lightning; do
  if "$venv/bin/python" -c "import $other" 2>/dev/null; then
    echo "check_samplers_alone: $other is importable in the samplers-only venv; the check would prove nothing" >&2
    exit 1
  fi
done
# Run from a copy of the tests so that the source tree is not on sys.path: the installed package is what is tested.
work="$scratch/tests"
mkdir -p "$work"
cp -r tests/conftest.py tests/samplers pyproject.toml "$work/"
cd "$work"
"$venv/bin/python" -m pytest -q -p no:cacheprovider samplers

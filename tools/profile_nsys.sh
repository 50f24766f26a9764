#!/usr/bin/env bash
# Record an Nsight Systems report of a short generation: NVTX ranges (load, plan, capture, prefill, every
# step) and CUDA graph nodes traced one by one, so each replayed copy and kernel shows on its stream.
#   usage: tools/profile_nsys.sh [MODEL_DIR] [OUTPUT_NAME] [extra `graphrt generate` flags...]
# Open the .nsys-rep in the Nsight Systems GUI, or `nsys stats OUTPUT.nsys-rep` for tables.
set -euo pipefail
model=${1:-weights/smollm2-135m-instruct}
out=${2:-graphrt-decode}
shift $(( $# > 2 ? 2 : $# ))
if ! command -v nsys >/dev/null; then
  echo "nsys (Nsight Systems) is not on PATH; install it, or see tools/nvtx_inject.c for a minimal NVTX logger" >&2
  exit 2
fi
nsys profile --trace=cuda,nvtx,osrt --cuda-graph-trace=node --force-overwrite=true -o "$out" \
  graphrt generate --model "$model" --max-new-tokens 64 "$@" "Once upon a time"
echo "wrote $out.nsys-rep"

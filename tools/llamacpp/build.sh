#!/usr/bin/env bash
# Build llama-bench, llama-batched-bench and llama-quantize from .peer/llama.cpp.tar.gz (tools/llamacpp/fetch.sh)
# with no network. CUDA (sm_90, H100/H200) by default into /tmp/keep/llama.cpp; --cpu builds GGML_CUDA=OFF
# into /tmp/keep/llama.cpp-cpu. The binaries land in <dir>/build/bin.
#
#   bash tools/llamacpp/build.sh [--cpu] [--detach] [--status] [--jobs N] [--tarball FILE] [--dir DIR]
#
# --detach: start the build in its own process session (setsid nohup) and return at once; it writes
#   /tmp/keep/llamacpp[-cpu]-build.log and, at the end, /tmp/keep/llamacpp[-cpu].done or .failed.
# --status: print done / failed / running / absent (and the log's tail); exit 0 only when done.
# An existing <dir>/build/bin/llama-bench skips the build (and writes the .done marker).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
KEEP=/tmp/keep
CPU=0; DETACH=0; STATUS=0; JOBS="$(nproc)"; TARBALL="$ROOT/.peer/llama.cpp.tar.gz"; DIR=""
ARGS=("$@")
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) CPU=1 ;;
        --detach) DETACH=1 ;;
        --status) STATUS=1 ;;
        --jobs) JOBS="$2"; shift ;;
        --tarball) TARBALL="$2"; shift ;;
        --dir) DIR="$2"; shift ;;
        -h|--help) sed -n 2,12p "$0"; exit 0 ;;
        *) echo "build.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
if [ "$CPU" = 1 ]; then TAG=llamacpp-cpu; DIR="${DIR:-$KEEP/llama.cpp-cpu}"; else TAG=llamacpp; DIR="${DIR:-$KEEP/llama.cpp}"; fi
LOG="$KEEP/$TAG-build.log"; DONE="$KEEP/$TAG.done"; FAILED="$KEEP/$TAG.failed"; PIDFILE="$KEEP/$TAG.pid"
BIN="$DIR/build/bin"
mkdir -p "$KEEP"

if [ "$STATUS" = 1 ]; then
    if [ -f "$DONE" ]; then echo "done: $(cat "$DONE")"; exit 0; fi
    if [ -f "$FAILED" ]; then echo "failed: $(cat "$FAILED")"; tail -n 40 "$LOG" 2>/dev/null; exit 1; fi
    if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
        echo "running (pid $(cat "$PIDFILE")): $(grep -o '^\[[0-9]*/[0-9]*\]' "$LOG" 2>/dev/null | tail -n 1)"
        tail -n 3 "$LOG" 2>/dev/null; exit 3
    fi
    echo "absent: no build started (or it was killed; see $LOG)"; exit 4
fi

if [ "$DETACH" = 1 ]; then
    rest=(); for a in "${ARGS[@]}"; do [ "$a" = --detach ] || rest+=("$a"); done
    if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
        echo "a build is already running (pid $(cat "$PIDFILE")); log $LOG"; exit 0
    fi
    rm -f "$DONE" "$FAILED"
    setsid nohup bash "$0" "${rest[@]}" > "$LOG" 2>&1 < /dev/null &
    echo $! > "$PIDFILE"
    echo "started build (pid $!): log $LOG, marker $DONE or $FAILED; check with: bash $0 ${rest[*]} --status"
    exit 0
fi

fail() { echo "$*" | tee "$FAILED" >&2; exit 1; }
trap 'rc=$?; [ $rc = 0 ] || [ -f "$FAILED" ] || echo "build failed (exit $rc) at $(date -Is); log $LOG" > "$FAILED"' EXIT
rm -f "$DONE" "$FAILED"
START=$(date +%s)

if [ -x "$BIN/llama-bench" ] && [ -x "$BIN/llama-batched-bench" ] && [ -x "$BIN/llama-quantize" ]; then
    echo "already built: $BIN"
    echo "$BIN (already built)" > "$DONE"; exit 0
fi
[ -f "$TARBALL" ] || fail "no $TARBALL: run tools/llamacpp/fetch.sh on a machine with internet (and carry .peer)"
if [ ! -f "$DIR/CMakeLists.txt" ]; then
    rm -rf "$DIR"; mkdir -p "$DIR"
    tar -xzf "$TARBALL" -C "$DIR" --strip-components=1
fi

FLAGS=(-G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF
       -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF
       -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_COMMON=ON -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF
       -DLLAMA_BUILD_MTMD=OFF -DLLAMA_LLGUIDANCE=OFF -DGGML_CCACHE=OFF -DGGML_RPC=OFF -DGGML_BLAS=OFF
       -DFETCHCONTENT_FULLY_DISCONNECTED=ON)
if [ "$CPU" = 1 ]; then
    FLAGS+=(-DGGML_CUDA=OFF)
else
    if ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then export PATH="/usr/local/cuda/bin:$PATH"; fi
    command -v nvcc >/dev/null || fail "no nvcc on PATH (nor /usr/local/cuda/bin): cannot build the CUDA backend"
    FLAGS+=(-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCH:-90}" -DGGML_CUDA_CUB_3DOT2=OFF
            -DGGML_CUDA_NCCL=OFF)
fi
echo "configure: cmake -S $DIR -B $DIR/build ${FLAGS[*]}"
cmake -S "$DIR" -B "$DIR/build" "${FLAGS[@]}" || fail "cmake configure failed at $(date -Is); log $LOG"
cmake --build "$DIR/build" -j "$JOBS" --target llama-bench llama-batched-bench llama-quantize \
    || fail "build failed at $(date -Is); log $LOG"
for b in llama-bench llama-batched-bench llama-quantize; do
    [ -x "$BIN/$b" ] || fail "build finished but $BIN/$b is missing"
done
echo "$BIN (built in $(( $(date +%s) - START )) s at $(date -Is))" | tee "$DONE"

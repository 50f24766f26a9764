#!/usr/bin/env bash
# Build llama-bench, llama-batched-bench and llama-quantize from .peer/llama.cpp.tar.gz (tools/llamacpp/fetch.sh)
# with no network. CUDA (sm_90, H100/H200) by default into /tmp/keep/llama.cpp; --cpu builds GGML_CUDA=OFF
# into /tmp/keep/llama.cpp-cpu. The binaries land in <dir>/build/bin.
#
#   bash tools/llamacpp/build.sh [--cpu] [--detach] [--status] [--no-amx] [--jobs N] [--tarball FILE] [--dir DIR]
#
# --detach: start the build in its own process session (setsid nohup) and return at once; it writes
#   /tmp/keep/llamacpp[-cpu]-build.log and, at the end, /tmp/keep/llamacpp[-cpu].done or .failed.
# --status: print done / failed / running / absent (and the log's tail); exit 0 only when done.
# --no-amx: compile the CPU backend without AMX (on the development VM this llama.cpp's AMX kernels died of
#   SIGILL/SIGSEGV on quantized weights in host memory; the peer then reruns without repacking). To rebuild,
#   give a new --dir (markers then are /tmp/keep/llamacpp[-cpu]-<dir name>.*) or remove the old build.
# An existing <dir>/build/bin/llama-bench skips the build (and writes the .done marker).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
KEEP=/tmp/keep
CPU=0; DETACH=0; STATUS=0; CFLAGS_EXTRA=""; JOBS="$(nproc)"; TARBALL="$ROOT/.peer/llama.cpp.tar.gz"; DIR=""
ARGS=("$@")
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) CPU=1 ;;
        --detach) DETACH=1 ;;
        --status) STATUS=1 ;;
        --no-amx) CFLAGS_EXTRA="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" ;;
        --jobs) JOBS="$2"; shift ;;
        --tarball) TARBALL="$2"; shift ;;
        --dir) DIR="$2"; shift ;;
        -h|--help) sed -n 2,15p "$0"; exit 0 ;;
        *) echo "build.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
TAG=llamacpp; [ "$CPU" = 1 ] && TAG=llamacpp-cpu
[ -n "$DIR" ] && TAG="$TAG-$(basename "$DIR")"   # markers of a build in another --dir don't mix with the default's
if [ -z "$DIR" ]; then  # (no `$(test && echo)` here: under set -e a false test in it ends the script)
    DIR="$KEEP/llama.cpp"
    if [ "$CPU" = 1 ]; then DIR="$DIR-cpu"; fi
fi
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
echo $$ > "$PIDFILE"  # this process, whether or not setsid forked (--status checks it)
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
       -DLLAMA_ALL_WARNINGS=OFF)
# A CUDA toolkit assembled from pip wheels (as on the lent GPU machines) may lack cuBLAS, which then lives in the
# Python environment (nvidia-cublas: nvidia/cu13/{include,lib}), and the unversioned libcuda.so (the driver's
# libcuda.so.1 is there): point CMake at them. CUBLAS_ROOT (a dir with include/ and lib/) overrides the search.
cuda_hints() {
    local nv tk found="" d lib drv
    nv="$(command -v nvcc)"
    nv="$(readlink -f "$nv")"
    # nvcc may be a wrapper script that execs the real one
    if head -c 2 "$nv" | grep -q '#!'; then nv="$(grep -o '/[^ "]*/bin/nvcc' "$nv" | head -n 1)"; fi
    tk="$(dirname "$(dirname "$nv")")"
    echo "CUDA toolkit: $tk"
    FLAGS+=(-DCUDAToolkit_ROOT="$tk")
    for d in "${CUBLAS_ROOT:-}" "$tk" "$tk/targets/x86_64-linux"; do
        if [ -n "$d" ] && [ -f "$d/include/cublas_v2.h" ]; then found="$d"; break; fi
    done
    if [ -z "$found" ]; then
        found="$(python3 -c 'import glob, os, nvidia
hits = [h for p in nvidia.__path__ for h in sorted(glob.glob(os.path.join(p, "*", "include", "cublas_v2.h")))]
print(os.path.dirname(os.path.dirname(hits[0])) if hits else "")' 2>/dev/null || true)"
    fi
    [ -n "$found" ] || fail "cuBLAS not found (no cublas_v2.h in $tk nor in python3's nvidia packages); set CUBLAS_ROOT"
    echo "cuBLAS: $found"
    if [ "$found" != "$tk" ] && [ "$found" != "$tk/targets/x86_64-linux" ]; then
        for lib in cublas cublasLt; do
            d="$(ls "$found"/lib/lib$lib.so* 2>/dev/null | head -n 1)"
            [ -n "$d" ] || fail "no lib$lib.so* in $found/lib"
            FLAGS+=(-DCUDA_${lib}_LIBRARY="$d")
        done
        FLAGS+=(-DCMAKE_CUDA_FLAGS="-I$found/include"); CXXFLAGS_EXTRA="-I$found/include"
    fi
    if ! ls "$tk"/lib64/stubs/libcuda.so "$tk"/lib64/libcuda.so "$tk"/targets/x86_64-linux/lib/stubs/libcuda.so \
            >/dev/null 2>&1; then
        drv="$(ldconfig -p 2>/dev/null | grep -o '/[^ ]*/libcuda\.so\.1$' | head -n 1 || true)"
        if [ -z "$drv" ]; then
            for d in ${LD_LIBRARY_PATH//:/ } /usr/local/nvidia/lib64 /usr/lib/x86_64-linux-gnu /usr/lib64; do
                if [ -e "$d/libcuda.so.1" ]; then drv="$d/libcuda.so.1"; break; fi
            done
        fi
        if [ -n "$drv" ]; then
            echo "CUDA driver library: $drv"; FLAGS+=(-DCUDA_cuda_driver_LIBRARY="$drv")
        else
            echo "no libcuda.so to link: building without CUDA VMM (GGML_CUDA_NO_VMM)"; FLAGS+=(-DGGML_CUDA_NO_VMM=ON)
        fi
    fi
}

if [ "$CPU" = 1 ]; then
    FLAGS+=(-DGGML_CUDA=OFF)
else
    if ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then export PATH="/usr/local/cuda/bin:$PATH"; fi
    command -v nvcc >/dev/null || fail "no nvcc on PATH (nor /usr/local/cuda/bin): cannot build the CUDA backend"
    FLAGS+=(-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCH:-90}" -DGGML_CUDA_CUB_3DOT2=OFF
            -DGGML_CUDA_NCCL=OFF)
    cuda_hints
fi
FLAGS+=(-DCMAKE_C_FLAGS="$CFLAGS_EXTRA" -DCMAKE_CXX_FLAGS="$CFLAGS_EXTRA ${CXXFLAGS_EXTRA:-}")
echo "configure: cmake -S $DIR -B $DIR/build ${FLAGS[*]}"
cmake -S "$DIR" -B "$DIR/build" "${FLAGS[@]}" || fail "cmake configure failed at $(date -Is); log $LOG"
cmake --build "$DIR/build" -j "$JOBS" --target llama-bench llama-batched-bench llama-quantize \
    || fail "build failed at $(date -Is); log $LOG"
for b in llama-bench llama-batched-bench llama-quantize; do
    [ -x "$BIN/$b" ] || fail "build finished but $BIN/$b is missing"
done
echo "$BIN (built in $(( $(date +%s) - START )) s at $(date -Is))" | tee "$DONE"

#!/usr/bin/env bash
# Repack the llama.cpp sources vendored in llama-cpp-python (PyPI sdist) into .peer/llama.cpp.tar.gz:
# only what builds llama-bench, llama-batched-bench and llama-quantize with the CPU and CUDA backends.
# Runs on a machine with internet (pip); the tarball travels to the GPU machine (no internet), where
# tools/llamacpp/build.sh builds it. Usage: bash tools/llamacpp/fetch.sh [VERSION]
set -euo pipefail
VERSION="${1:-0.3.36}"
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
OUT="$ROOT/.peer/llama.cpp.tar.gz"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

python3 -m pip download "llama-cpp-python==$VERSION" --no-binary :all: --no-deps -d "$TMP/dl" -q
tar -xzf "$TMP"/dl/llama_cpp_python-*.tar.gz -C "$TMP"
SRC="$(echo "$TMP"/llama_cpp_python-*/vendor/llama.cpp)"
[ -f "$SRC/CMakeLists.txt" ] || { echo "no vendor/llama.cpp in the sdist" >&2; exit 1; }

DST="$TMP/llama.cpp"
mkdir -p "$DST/tools" "$DST/vendor" "$DST/ggml/src"
cp -a "$SRC"/{CMakeLists.txt,LICENSE,cmake,include,src,common} "$DST/"
cp -a "$SRC"/ggml/{CMakeLists.txt,cmake,include} "$DST/ggml/"
# ggml core + the CPU and CUDA backends (every other backend is OFF by default and left out)
find "$SRC/ggml/src" -maxdepth 1 -type f -exec cp -a {} "$DST/ggml/src/" \;
cp -a "$SRC"/ggml/src/{ggml-cpu,ggml-cuda} "$DST/ggml/src/"
cp -a "$SRC"/tools/{llama-bench,batched-bench,quantize} "$DST/tools/"
cp -a "$SRC"/vendor/{nlohmann,sheredom,cpp-httplib} "$DST/vendor/"
[ -d "$SRC/gguf-py" ] && cp -a "$SRC/gguf-py" "$DST/"   # small; handy for inspecting files on the GPU machine
rm -rf "$DST/gguf-py/tests" "$DST/gguf-py/examples"

# tools/ and vendor/ list subdirectories we dropped: replace their CMakeLists with the three targets
cat > "$DST/tools/CMakeLists.txt" <<'CM'
# graphrt peer repack: only the three tools the benchmark runs
find_package(Threads REQUIRED)
llama_add_compile_flags()
add_subdirectory(batched-bench)
add_subdirectory(llama-bench)
add_subdirectory(quantize)
CM
cat > "$DST/vendor/CMakeLists.txt" <<'CM'
# graphrt peer repack: what llama-common needs
add_subdirectory(nlohmann)
add_subdirectory(sheredom)
if (LLAMA_BUILD_COMMON)
    add_subdirectory(cpp-httplib)
endif()
CM
# llama-batched-bench prints its table through common's asynchronous logger and returns without flushing it:
# under load its last rows can be lost at exit (llama.cpp issue 22142). Flush before returning.
BB="$DST/tools/batched-bench/batched-bench.cpp"
grep -q '^    llama_backend_free();' "$BB" || { echo "batched-bench.cpp changed: cannot add the log flush" >&2; exit 1; }
sed -i 's/^    llama_backend_free();/    common_log_flush(common_log_main()); \/\/ graphrt peer: keep the last rows\n    llama_backend_free();/' "$BB"
echo "llama-cpp-python $VERSION (PyPI sdist), vendor/llama.cpp; repacked by graphrt tools/llamacpp/fetch.sh" \
    > "$DST/PEER_SOURCE.txt"

mkdir -p "$ROOT/.peer"
tar -C "$TMP" -czf "$OUT" llama.cpp
echo "wrote $OUT: $(du -h "$OUT" | cut -f1) ($(stat -c %s "$OUT") bytes)"

#!/usr/bin/env bash
# The one GPU session script, run on the lent GPU from the repository root:
#   tools/gpu_check.sh PART...   PART: tests (GPU tests without the default model), model (tests that
#   need the default model), quant (quantized-format kernels, timed), decode (tools/bench_decode.py), profile (per-kernel
#   time of resident steps and the GEMV block-size sweep), peer-build / peer-graphrt / peer-finish (graphrt beside
#   llama.cpp, carry .peer: the first starts llama.cpp's detached build; the second waits for it, so the CPU lane
#   has the CPU to itself, and runs graphrt's rows; the third runs llama.cpp and writes the table; each in its
#   own call on the warm machine),
#   int4 (one-row int4 GEMV kernels side by side), copy (copy kernels vs memcpy nodes), host (host cost of steps and the decode loop's timeline), prefill, cpu-probe (CPU GEMV paths), model-speed (the default model against .old/<commit> packages), round (a speculative round's kernels and timeline, ROUND_ARGS e.g. "--dtype bfloat16 --ring 16"), fused-probe (fused int4 products against apart), mlp-probe (an 8B MLP group's GPU time against its kernels, MLP_PROBE_ARGS), prompt-host (cProfile of an eager prompt), lane-sync (the CPU lane, spinning vs sleeping waiters), lane-probe (one lane group's cost in a graph, LANE_PROBE_ARGS), lane-timeline (a lane step measured in the graph against its plan, LANE_TIMELINE_ARGS), lane-timeline-quant (the same for int8 and int4 at batch 1), lane-memory (the lane's CPU rate from each kind of host memory), lane-calibration (the lane timed back to back, with idle gaps, without copies), lane-timeline-old (lane-timeline on .old/<commit> packages, LANE_TIMELINE_OLD_ARGS), lane-drift (the lane's rate in the step sampled after loads, LANE_DRIFT_ARGS), lane-rows (the versus benchmark's CPU-lane rows alone, LANE_ROWS_ARGS), lane-parts (the lane's host function on MLP parts of several sizes: a cost per group?), lane-tests (CPU lane and CPU int4 kernel tests, CPU ones too) (prompts on a streamed plan), tp (2 GPUs: tensor-parallel tests and tools/bench_tp.py), bench (`graphrt bench`), or all.
# Writes everything under $OUT. Carry .whl (nvtx, gguf wheels). The default model's GGUF (98 MB) is larger
# than one call may carry: it travels in two halves, .dev1/part1 in one call (kept in /tmp/keep) and
# .dev2/part2 in the next, and is reassembled here for GRAPHRT_DEFAULT_GGUF.
set -uo pipefail
parts=${*:-all}
OUT=${OUT:-/tmp/graphrt-gpu-out}
mkdir -p "$OUT" /tmp/keep
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
[ -f .dev1/part1 ] && cp .dev1/part1 /tmp/keep/part1
if [ -f /tmp/keep/part1 ] && [ -f .dev2/part2 ] && [ ! -f /tmp/keep/default.gguf ]; then
  cat /tmp/keep/part1 .dev2/part2 > /tmp/keep/default.gguf
fi
[ -f /tmp/keep/default.gguf ] && export GRAPHRT_DEFAULT_GGUF=/tmp/keep/default.gguf
{
  echo "# graphrt GPU check ($parts)"
  echo "date: $(date -u +%Y-%m-%dT%H:%MZ)  commit: ${GRAPHRT_COMMIT:-unknown}"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
} | tee -a "$OUT/env.txt"
{   # the host the CPU lane runs on: cores, SMT, NUMA nodes, caches, huge-page and NUMA-balancing policy
  lscpu 2>/dev/null | grep -E "^(Model name|CPU\(s\)|Thread|Core|Socket|NUMA|L3|Flags)" | cut -c1-200
  for f in /sys/kernel/mm/transparent_hugepage/enabled /sys/kernel/mm/transparent_hugepage/defrag \
           /proc/sys/kernel/numa_balancing; do [ -r "$f" ] && echo "$f: $(cat "$f")"; done
  grep -E "MemTotal|MemAvailable|HugePages_Total|AnonHugePages" /proc/meminfo
} > "$OUT/host.txt" 2>&1
has() { [[ " $parts " == *" $1 "* || " $parts " == *" all "* ]]; }
pytest_gpu() {  # $1: log name, rest: pytest selection
  local log=$1; shift
  timeout ${TEST_TIMEOUT_S:-420} python3 -m pytest -q -rs -m gpu -p no:cacheprovider --durations=10 "$@" 2>&1 \
    | tee "$OUT/$log.log" \
    | grep -v -E "^$|Loading weights" | tail -25
}
wait_build() {  # until llama.cpp's detached build has ended (the CPU lane must not share the CPU with it)
  for i in $(seq 1 ${PEER_WAIT_S:-420}); do
    bash tools/llamacpp/build.sh --status >/dev/null 2>&1 && break
    [ -f /tmp/keep/llamacpp.failed ] && break
    sleep 1
  done
  bash tools/llamacpp/build.sh --status 2>&1 | tail -3
}
if has peer-build; then  # starts llama.cpp's build (detached, ~5 min on 16 cores) and returns
  bash tools/llamacpp/build.sh --detach 2>&1 | tail -2
  sleep 5; bash tools/llamacpp/build.sh --status 2>&1 | tail -2
fi
if has tests; then
  pytest_gpu gpu_tests ${GPU_TESTS:-tests} -k "not default"
fi
if has model; then
  if [ -z "${GRAPHRT_DEFAULT_GGUF:-}" ]; then echo "model: the default GGUF is not here (carry .dev1 then .dev2)"; else
    python3 -m graphrt.cli fetch-default 2>&1 | tail -1
    pytest_gpu gpu_model_tests tests -k "default"
  fi
fi
if has quant; then
  pytest_gpu gpu_quant_tests tests/test_gpu_quant.py -k "not default"
  timeout 400 python3 -m graphrt.cli bench --only quant --out "$OUT" 2>&1 | grep -v "Loading weights" \
    | tee "$OUT/bench_quant.log" | tail -22
fi
if has int4; then  # the one-row int4 kernels side by side (tools/int4_row_sweep.py)
  timeout 300 python3 tools/int4_row_sweep.py --out "$OUT" 2>&1 | tee "$OUT/int4_row_sweep.log"
fi
if has copy; then  # copies as kernels against copy-engine memcpys, and graph launch cost (tools/copy_probe.py)
  timeout 240 python3 tools/copy_probe.py --out "$OUT" 2>&1 | tee "$OUT/copy_probe.log"
fi
if has host; then  # host time per step of streamed graphs, memcpy nodes against copy kernels (tools/host_cost.py)
  timeout 300 python3 tools/host_cost.py --out "$OUT" --modes ${HOST_MODES:-memcpy} 2>&1 | grep -v "Loading weights" | tee "$OUT/host_cost.log"
fi
if has prefill; then  # prompts on a streamed plan against their limit (graphrt bench --only prefill)
  timeout 300 python3 -m graphrt.cli bench --only prefill --out "$OUT" 2>&1 | grep -v "Loading weights" \
    | tee "$OUT/bench_prefill.log" | tail -20
fi
if has cpu-probe; then  # the CPU lane's GEMV paths on this host, alone and beside H2D copies (tools/cpu_gemv_probe.py)
  timeout 300 python3 tools/cpu_gemv_probe.py --out "$OUT" ${CPU_PROBE_ARGS:-} 2>&1 | tail -3
fi
if has model-speed; then  # default model, resident graph replay: this tree against old commits carried in .old/<commit>
  if [ -z "${GRAPHRT_DEFAULT_GGUF:-}" ]; then echo "model-speed: the default GGUF is not here (carry .dev1 then .dev2)"; else
    python3 -m graphrt.cli fetch-default 2>&1 | tail -1
    for old in .old/*/; do
      PYTHONPATH=/tmp/site:$old timeout 120 python3 tools/default_speed.py "$(basename $old)" "$PWD/weights/smollm2-135m-instruct" --out "$OUT" 2>&1 | tail -2
    done
    timeout 120 python3 tools/default_speed.py "${GRAPHRT_COMMIT:-this}" --out "$OUT" 2>&1 | tail -2
  fi
fi
if has round; then  # where a captured speculative round's time goes (tools/profile_round.py)
  timeout 240 python3 tools/profile_round.py --out "$OUT" ${ROUND_ARGS:-} 2>&1 | grep -v "Loading weights" | tee "$OUT/profile_round.log"
fi
if has fused-probe; then  # int4 products with their neighbours fused, against the steps apart (tools/int4_fused_probe.py)
  timeout 200 python3 tools/int4_fused_probe.py --out "$OUT" 2>&1 | tee "$OUT/int4_fused_probe.log"
fi
if has mlp-probe; then  # one 8B decode MLP group against its kernels alone, per format (tools/mlp_probe.py)
  timeout 300 python3 tools/mlp_probe.py --out "$OUT" ${MLP_PROBE_ARGS:-} 2>&1 | tee "$OUT/mlp_probe.log"
fi
if has prompt-host; then  # the host's time in an eager prompt step, cProfile (tools/prompt_host.py)
  timeout 300 python3 tools/prompt_host.py --out "$OUT" 2>&1 | grep -v "Loading weights" | head -80
fi
if has lane-probe; then  # one CPU-lane group's cost in a captured step beyond its math (tools/lane_probe.py)
  timeout 300 python3 tools/lane_probe.py --out "$OUT" ${LANE_PROBE_ARGS:-} 2>&1 | tee "$OUT/lane_probe.log"
fi
if has lane-timeline; then  # a CPU-lane step measured inside the graph against its plan (tools/lane_timeline.py)
  timeout ${LANE_TIMELINE_S:-420} python3 tools/lane_timeline.py --out "$OUT" ${LANE_TIMELINE_ARGS:-} 2>&1 | grep -v "Loading weights" | tee "$OUT/lane_timeline.log"
fi
if has lane-timeline-quant; then  # the same at batch 1 for the int8 and int4 lanes (one folder each)
  for q in int8 int4; do
    timeout ${LANE_TIMELINE_S:-420} python3 tools/lane_timeline.py --out "$OUT/$q" --batches 1 --quantization $q \
      ${LANE_TIMELINE_QUANT_ARGS:-} 2>&1 \
      | grep -v "Loading weights" | tee "$OUT/lane_timeline_$q.log"
  done
fi
if has lane-timeline-old; then  # the same tool on old packages carried in .old/<commit> (an A/B on one machine)
  for old in .old/*/; do
    PYTHONPATH=/tmp/site:$old timeout ${LANE_TIMELINE_S:-420} python3 tools/lane_timeline.py --out "$OUT/old-$(basename $old)" \
      ${LANE_TIMELINE_OLD_ARGS:-} 2>&1 | grep -v "Loading weights" | tee "$OUT/lane_timeline_old_$(basename $old).log"
  done
fi
if has lane-calibration; then  # the calibration's way of timing the lane against idle gaps and no copies (tools/lane_calibration_probe.py)
  timeout 300 python3 tools/lane_calibration_probe.py --out "$OUT" ${LANE_CALIBRATION_ARGS:-} 2>&1 | tee "$OUT/lane_calibration.log" | tail -30
fi
if has lane-memory; then  # the lane's CPU rate from each kind of host memory (tools/lane_memory_probe.py)
  timeout 300 python3 tools/lane_memory_probe.py --out "$OUT" ${LANE_MEMORY_ARGS:-} 2>&1 | tee "$OUT/lane_memory.log" | tail -20
fi
if has lane-drift; then  # the lane's rate in the step, sampled for a minute after each load (tools/lane_drift.py)
  cat /sys/kernel/mm/transparent_hugepage/enabled /sys/kernel/mm/transparent_hugepage/defrag 2>&1 | tee "$OUT/lane_drift.log"
  timeout ${LANE_DRIFT_S:-420} python3 tools/lane_drift.py --out "$OUT" ${LANE_DRIFT_ARGS:-} 2>&1 | grep -v "Loading weights" | tee -a "$OUT/lane_drift.log"
fi
if has lane-rows; then  # the versus benchmark's CPU-lane rows alone (tools/lane_rows.py, LANE_ROWS_ARGS)
  timeout ${LANE_ROWS_S:-560} python3 tools/lane_rows.py --out "$OUT" ${LANE_ROWS_ARGS:-} 2>&1 | grep -v "Loading weights" | tee -a "$OUT/lane_rows.log" | grep -v '^{'
fi
if has lane-parts; then  # the lane's host function on MLP parts of several sizes (tools/lane_parts_probe.py)
  timeout 300 python3 tools/lane_parts_probe.py --out "$OUT" ${LANE_PARTS_ARGS:-} 2>&1 | tee "$OUT/lane_parts_probe.log"
fi
if has lane-tests; then  # the CPU lane and the CPU int4 kernel on this host (CPU tests included)
  timeout ${TEST_TIMEOUT_S:-420} python3 -m pytest -q -rs -p no:cacheprovider tests/test_cpu_lane.py tests/test_int4_cpu.py tests/test_pieces.py tests/test_split_lane.py tests/test_lane_in_step.py tests/test_lane_signal.py tests/test_int8_cpu.py tests/test_cpu_program.py tests/test_group_cost.py 2>&1 \
    | tee "$OUT/lane_tests.log" | tail -8
fi
if has lane-sync; then  # the CPU lane with spinning against sleeping waiters (tools/lane_sync.py)
  timeout 420 python3 tools/lane_sync.py --out "$OUT" 2>&1 | grep -v "Loading weights" | tee "$OUT/lane_sync.log"
fi
if has decode; then
  python3 tools/bench_decode.py --out "$OUT" 2>&1 | tee "$OUT/bench_decode.log" | tail -30
fi
if has profile; then
  python3 tools/profile_step.py --out "$OUT" ${PROFILE_ARGS:-} 2>&1 | grep -v "Loading weights" | tee "$OUT/profile.log"
  [ "${SWEEP_S:-0}" != 0 ] && python3 tools/gemv_sweep.py --out "$OUT" --budget-s $SWEEP_S 2>&1 | tee "$OUT/gemv_sweep.log"
fi
if has peer-graphrt; then  # graphrt's rows, once the build has ended
  wait_build
  timeout ${PEER_GRAPHRT_S:-500} python3 - <<'PY' 2>&1 | grep -v "Loading weights" | tee -a "$OUT/versus_graphrt.log"
from pathlib import Path
from graphrt.bench.run import make_bench_model
from graphrt.bench.versus import LAYERS, graphrt_rows
path = make_bench_model(Path("/tmp/graphrt-bench/llama8b-16"), LAYERS)
graphrt_rows(path, keep=Path("/tmp/keep/versus_graphrt.json"))   # resumes: a second call runs the rows left
PY
  cp /tmp/keep/versus_graphrt.json "$OUT/" 2>/dev/null
fi
if has peer-finish; then  # llama.cpp on the same model and split, then one table
  wait_build
  timeout 560 python3 -m graphrt.cli bench --only peer --graphrt-json /tmp/keep/versus_graphrt.json --out "$OUT" 2>&1 \
    | tee "$OUT/versus.log" | tail -40
fi
if has spec; then  # needs the default model (GRAPHRT_DEFAULT_GGUF, see above); SPEC_TESTS=0 skips its tests
  [ "${SPEC_TESTS:-1}" != 0 ] && timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_speculative.py 2>&1 \
    | tee "$OUT/gpu_spec_tests.log" | tail -3
  timeout 560 python3 -m graphrt.cli bench --only spec --out "$OUT" 2>&1 | grep -v "Loading weights" \
    | tee "$OUT/bench_spec.log" | tail -30
fi
if has tp; then  # 2+ GPUs (nvidia-h100-x2): the NCCL tests and the speed rows; NVLink multicast stays off
  export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
  timeout ${TP_TEST_S:-300} python3 -m pytest -q -rs -m gpu -p no:cacheprovider tests/test_tensor_parallel.py 2>&1 \
    | tee "$OUT/gpu_tp_tests.log" | tail -15
  timeout ${TP_BENCH_S:-420} python3 -m torch.distributed.run --nproc-per-node ${TP:-2} tools/bench_tp.py --out "$OUT" 2>&1 | grep -v "Loading weights" \
    | tee "$OUT/bench_tp.log" | tail -20
fi
if has bench; then
  timeout 560 python3 -m graphrt.cli bench --out "$OUT" 2>&1 | grep -v "Loading weights" \
    | tee "$OUT/graphrt_bench.log" | tail -50
fi

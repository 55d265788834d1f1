#!/usr/bin/env bash
# One device call = one subcommand of this script, each meant to finish in under 9 minutes:
#
#   bash benchmarks/gpu/device.sh CALL        (from the repository root of the device's copy)
#
#   call1  install check, lylm smoke test on a 0.5B shape, pool overhead (1.5B shape)
#   call2  lylm vs vllm serve, 1.5B shape
#   call3  lylm vs vllm serve, 3B shape, then the seed's table through lylm
#   call4  two instances on one GPU vs one (1.5B shape)
#   call5  balancers on two real engines: shared-prefix and skewed-length scenarios (1.5B shape)
#   call6  lylm with and without gc.freeze() against vllm serve: are TTFT tails GC pauses? (1.5B)
#   call7  pool overhead again, rounds alternating Python's default GC and a frozen heap (1.5B)
#   multi1 several GPUs (issues 8, 12): one instance per GPU, pinning in nvidia-smi, scaling 1/2/4/8 GPUs (1.5B)
#   multi2 several GPUs (issue 8): the balancers with one instance per GPU (1.5B)
#   place  placement (issue 12), any GPU count: pinning at spawn, warm start times, the 1:2 split (1.5B)
#   clients issue 13's mechanism: one engine core, 1/2/4 front-end processes attached to it (1.5B, no HTTP)
#   workers issue 13: lylm --workers 1/4 vs vllm serve --api-server-count 1/4, one engine on one GPU (1.5B)
#   workers2 the same, lylm --workers 2/4 vs vllm serve --api-server-count 4, more rounds
#   workersk 3 instances (0.5B) on one GPU, lylm --workers 1 vs 3
#   ceiling issue 13: front-end ceiling with 1/2/4/8 workers over fake engines, on the host's CPUs
#   harness issue 16: the one harness on a GPU: pool overhead (short), lylm vs vllm serve (1.5B, short grid)
#   remote issue 17: a remote instance (vllm serve --headless, another process) vs the same engine local,
#           both on GPU 0 (1.5B shape)
#   lifecycle issue 17: a remote instance under lylm core beside a local one (1.5B, GPU 0): attach, SIGKILL,
#           SIGSTOP (heartbeats), pool restart; then remote vs local again, heartbeats on
#   hbalarms issue 17: heartbeat false alarms at the default 1.2 s: attach/kill rounds of a remote core
#           under lylm core beside a local engine (1.5B, GPU 0), 64 streams; and the stray-connection watch on 0.26
#   eject  issue 16: the ejection distribution of a SIGKILLed engine core (two 1.5B engines on GPU 0)
#   tests26 issue 14: the OpenAI adapter's engine tests and the differential test against vllm serve,
#           on the kit's vLLM 0.26 (the snapshot carries tests/ and pytest's wheels in whl/)
#   hub26  issue 26: the hub's ceiling (8 worker-like drivers, no engine), then a worker SIGKILLed and
#           the hub SIGSTOPped for 5 s under load (lylm serve --workers 4, 1.5B)
#   ttft26 issue 26: lylm --workers 4 vs vllm serve --api-server-count 4, one engine, 64 and 256 streams
#           of 256 tokens and 256 streams of 8 tokens, 3 rounds (ttft26s: 64 x 256 and 256 x 8 only)
#   kv29   issue 29: kv_aware vs prefix_aware vs least_outstanding on two engines sharing GPU 0 (1.5B),
#           KV events from vLLM 0.26 on CUDA (16-token blocks), predicted against reported cached tokens
#
# Every scenario script lives in benchmarks/ and runs here with --device gpu (benchmarks/harness.py).
# Layout it expects (see BENCHMARKS.md, GPU section): the code to run under $RUN (default
# .gpurun, a copy of this repository's lylm/, benchmarks/, examples/ and a whl/ folder with
# wheels the device image lacks), the offline vLLM kit's part folder under .gpukit/part00
# (installed only if /tmp/vllm-site is not there yet), and $OUT for results.
set -uo pipefail
CALL=${1:?usage: device.sh call1|call2|...|call7|multi1|multi2|place|placequick|clients|workers|workers2|workersk|ceiling|harness|eject|remote|lifecycle|hbalarms|tests26|hub26|ttft26|ttft26s|kv29}
RUN=${RUN:-.gpurun}
OUT=${OUT:-/tmp/gpu-out}
MODELS=${MODELS:-/tmp/models}
LIMIT=${LIMIT:-570}          # seconds this call may take in all; scripts plan their rounds within it
mkdir -p "$OUT"
LOG="$OUT/console_$CALL.log"
exec > >(tee -a "$LOG") 2>&1

if [ ! -f /tmp/vllm-site/env.sh ]; then
  [ -d .gpukit/part00 ] || { echo "no vLLM kit here and none carried (.gpukit/part00)"; exit 2; }
  mkdir -p /root/gpukit && cp .gpukit/part00/* /root/gpukit/ || exit 2
  bash /root/gpukit/install-kit.sh /root/gpukit || exit 2
else
  echo "vLLM kit already installed (warm machine)"
fi
# shellcheck disable=SC1091
. /tmp/vllm-site/env.sh
if ! python3 -c 'import orjson' 2> /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/lylm-site "$RUN"/whl/*.whl || exit 2
fi
export PYTHONPATH=$PWD/$RUN:/tmp/lylm-site:$PYTHONPATH PYTHONUNBUFFERED=1
# The snapshot has no .git: the commit it was copied from travels in $RUN/COMMIT (see README).
LYLM_COMMIT=$(cat "$RUN/COMMIT" 2> /dev/null || echo unknown); export LYLM_COMMIT
# From / : with -c, Python puts the working directory (this checkout, with its own lylm/) first.
(cd / && python3 -c 'import lylm, orjson, starlette, uvicorn, httpx, prometheus_client, attrs, anyio; print("lylm from", lylm.__file__)') || exit 2
nvidia-smi --query-gpu=index,name,memory.used,memory.total,driver_version --format=csv
for s in 0.5b 1.5b 3b; do
  [ -f "$MODELS/$s/config.json" ] || python3 /root/gpukit/make-dummy-model.py "qwen2.5-$s" "$MODELS/$s" > /dev/null || exit 2
done
echo "setup done after ${SECONDS} s"
left() { echo $((LIMIT - SECONDS)); }
B="$RUN/benchmarks"   # the scenario scripts (this script stays in benchmarks/gpu/)

case $CALL in
  call1)
    timeout 300 python3 "$B/smoke.py" --device gpu --model-dir "$MODELS/0.5b" \
      --engine-args '{"enforce_eager": true, "max_model_len": 2048, "gpu_memory_utilization": 0.3}' \
      --drop max_num_seqs max_num_batched_tokens --bad-gpu 1 --bad-gpu-timeout 90 --out "$OUT/smoke"
    echo "smoke done after ${SECONDS} s"
    python3 "$B/pool_overhead.py" --device gpu --model-dir "$MODELS/1.5b" --engine-args '{"gpu_memory_utilization": 0.85}' \
      --budget-s "$(($(left) - 30))" --out "$OUT/pool_overhead_gpu"
    ;;
  harness)
    python3 "$B/pool_overhead.py" --device gpu --model-dir "$MODELS/1.5b" --engine-args '{"gpu_memory_utilization": 0.4}' \
      --rounds 4 --budget-s 100 --out "$OUT/pool_overhead_1.5b"
    echo "pool overhead done after ${SECONDS} s"
    python3 "$B/server_vs_vllm.py" --device gpu --model-dir "$MODELS/1.5b" --shape qwen2.5-1.5b \
      --grid 1x4,64x256,256x1024 --rounds 2 --min-rounds 2 --budget-s "$(($(left) - 150))" \
      --out "$OUT/server_vs_vllm_1.5b" --log-dir /tmp/logs-harness
    ;;
  remote)
    timeout "$(($(left) - 10))" python3 "$B/remote_vs_local.py" --device gpu --model-dir "$MODELS/1.5b" \
      --shape qwen2.5-1.5b --requests 1024 --concurrency 128 --prompt-len 128 --max-tokens 256 --rounds 6 \
      --out "$OUT/remote_vs_local_1.5b"
    ;;
  lifecycle)
    timeout "$(($(left) - 10))" python3 "$B/remote_lifecycle.py" --device gpu --model-dir "$MODELS/1.5b" \
      --shape qwen2.5-1.5b --streams 16 --out "$OUT/remote_lifecycle_1.5b"
    echo "lifecycle done after ${SECONDS} s"
    timeout "$(($(left) - 10))" python3 "$B/remote_vs_local.py" --device gpu --model-dir "$MODELS/1.5b" \
      --shape qwen2.5-1.5b --requests 1024 --concurrency 128 --prompt-len 128 --max-tokens 256 --rounds 4 \
      --out "$OUT/remote_vs_local_hb_1.5b"
    ;;
  hbalarms)
    perf=""; command -v perf > /dev/null && perf="--perf"
    timeout "$(($(left) - 10))" python3 "$B/heartbeat_alarms.py" --device gpu --model-dir "$MODELS/1.5b" \
      --shape qwen2.5-1.5b --streams 64 --max-tokens 256 --attaches 8 --budget-s "$(($(left) - 120))" $perf \
      --out "$OUT/heartbeat_alarms_1.5b"
    ;;
  eject)
    timeout "$(($(left) - 10))" python3 "$B/ejection.py" --device gpu --model-dir "$MODELS/1.5b" --shape qwen2.5-1.5b \
      --runs 3 --streams 16 --out "$OUT/ejection_1.5b"
    ;;
  call2)
    python3 "$B/server_vs_vllm.py" --device gpu --model-dir "$MODELS/1.5b" --shape qwen2.5-1.5b \
      --budget-s "$(($(left) - 40))" --out "$OUT/server_vs_vllm_1.5b" --log-dir /tmp/logs-call2
    ;;
  call3)
    python3 "$B/server_vs_vllm.py" --device gpu --model-dir "$MODELS/3b" --shape qwen2.5-3b --seed-table \
      --budget-s "$(($(left) - 40))" --out "$OUT/server_vs_vllm_3b" --log-dir /tmp/logs-call3
    ;;
  call4)
    python3 "$B/two_instances.py" --device gpu --model-dir "$MODELS/1.5b" --shape qwen2.5-1.5b \
      --budget-s "$(($(left) - 40))" --out "$OUT/two_instances_1.5b" --log-dir /tmp/logs-call4
    ;;
  call5)
    python3 "$B/balancers.py" --device gpu --model-dir "$MODELS/1.5b" --shape qwen2.5-1.5b \
      --budget-s "$(($(left) - 40))" --out "$OUT/balancers_1.5b" --log-dir /tmp/logs-call5
    ;;
  call6)
    python3 "$B/gc_pauses.py" --device gpu --model-dir "$MODELS/1.5b" --shape qwen2.5-1.5b \
      --budget-s "$(($(left) - 40))" --out "$OUT/gc_pauses_1.5b" --log-dir /tmp/logs-call6
    ;;
  call7)
    python3 "$B/pool_overhead.py" --device gpu --model-dir "$MODELS/1.5b" --engine-args '{"gpu_memory_utilization": 0.85}' \
      --rounds 8 --gc-modes none,freeze --budget-s "$(($(left) - 30))" --out "$OUT/pool_overhead_gc_1.5b"
    ;;
  multi1)  # issues 8, 12, on nvidia-h200-x2 or -x4: pinning, scaling over 1/2/4 GPUs
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
      python3 "$B/multi_gpu.py" --device gpu --model-dir "$MODELS/1.5b" --shape qwen2.5-1.5b \
      --budget-s "$(($(left) - 40))" --out "$OUT/multi_gpu_1.5b" --log-dir /tmp/logs-multi1
    ;;
  multi2)  # issue 8: the balancers with one instance per GPU
    python3 "$B/balancers.py" --device gpu --model-dir "$MODELS/1.5b" --shape qwen2.5-1.5b --separate-gpus --gpu-mem 0.85 \
      --budget-s "$(($(left) - 40))" --out "$OUT/balancers_2gpu_1.5b" --log-dir /tmp/logs-multi2
    ;;
  place)  # issue 12: pinning by CUDA_VISIBLE_DEVICES at spawn, start times with a warm compile cache
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
      python3 "$B/placement.py" --device gpu --model-dir "$MODELS/1.5b" --shape qwen2.5-1.5b \
      --budget-s "$(($(left) - 40))" --out "$OUT/placement_1.5b" --log-dir /tmp/logs-place
    ;;
  placequick)  # issue 12 on a short device budget: 0.5B, cold start, placement config, pinning, split
    KIT_SKIP_GPU_TEST=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
      python3 "$B/placement.py" --device gpu --model-dir "$MODELS/0.5b" --shape qwen2.5-0.5b --quick --split-requests 600 \
      --split-tokens 16 --out "$OUT/placement_quick_0.5b" --log-dir /tmp/logs-placequick
    ;;
  clients)  # issue 13: does spreading output processing over front-end processes pay on one GPU?
    python3 "$B/engine_clients.py" --device gpu --model-dir "$MODELS/1.5b" --clients 1,2,4 --streams 256 --requests 1024 \
      --rounds 3 --out "$OUT/engine_clients_1.5b"
    ;;
  workers)  # issue 13: lylm --workers 1/4 vs vllm serve --api-server-count 1/4, one engine on one GPU
    python3 "$B/workers_vs_vllm.py" --device gpu --model-dir "$MODELS/1.5b" --shape qwen2.5-1.5b \
      --budget-s "$(($(left) - 40))" --out "$OUT/workers_vs_vllm_1.5b" --log-dir /tmp/logs-workers
    ;;
  workers2)  # issue 13, more rounds: lylm --workers 2 and 4 vs vllm serve --api-server-count 4
    python3 "$B/workers_vs_vllm.py" --device gpu --model-dir "$MODELS/1.5b" --shape qwen2.5-1.5b --arms lylm:4,vllm:4,lylm:2 \
      --rounds 3 --budget-s "$(($(left) - 40))" --out "$OUT/workers_vs_vllm_1.5b_r2" --log-dir /tmp/logs-workers2
    ;;
  workersk)  # issue 13 on one GPU standing in for several: 3 instances (0.5B), lylm --workers 1 vs 3
    python3 "$B/workers_vs_vllm.py" --device gpu --model-dir "$MODELS/0.5b" --shape qwen2.5-0.5b --arms lylm:1,lylm:3 \
      --instances 3 --gpu-mem 0.13 --rounds 2 --budget-s "$(($(left) - 30))" --out "$OUT/workers_3_instances_0.5b" \
      --log-dir /tmp/logs-workersk
    ;;
  tests26)  # issue 14: tools/reasoning, echo, sampling defaults and the parity test, on vLLM 0.26
    python3 -c 'import pytest' 2> /dev/null || python3 -m pip install -q --no-index --no-deps --no-compile \
      --target /tmp/lylm-site "$RUN"/whl/pytest-*.whl "$RUN"/whl/pluggy-*.whl "$RUN"/whl/iniconfig-*.whl || exit 2
    # The warnings filter (errors) is the CPU build's; vLLM 0.26 on CUDA warns otherwise.
    (cd "$RUN" && LYLM_TEST_ENGINE_ARGS='{"gpu_memory_utilization": 0.08}' timeout "$(($(left) - 20))" \
      python3 -m pytest -q -p no:cacheprovider -p no:warnings -o addopts="" \
      ${TESTS:-tests/test_openai_tools.py tests/test_vllm_parity.py tests/test_openai_sampling.py}) > "$OUT/tests26.log" 2>&1
    grep -a -E "^(E |FAILED|ERROR)|passed|failed" "$OUT/tests26.log" | cut -c1-400 | tail -60
    ;;
  ceiling)  # issue 13: the front end's ceiling with 1/2/4/8 workers over fake engines, on this host's CPUs
    # (no --device: fake engines, no model; the result says "no GPU used")
    python3 "$B/worker_ceiling.py" --procs 6 --budget "$(($(left) - 30))" --out "$OUT/worker_ceiling_gpu_host"
    ;;
  hub26)  # issue 26: the hub's ceiling on this host's CPUs, then faults under load on a real engine
    timeout 200 python3 "$B/hub_ceiling.py" --workers 8 --streams 64 --window 5 --rounds 3 --out "$OUT/hub_ceiling_gpu_host"
    echo "hub ceiling done after ${SECONDS} s"
    timeout "$(($(left) - 10))" python3 "$B/worker_faults.py" --device gpu --model-dir "$MODELS/1.5b" --shape qwen2.5-1.5b \
      --workers 4 --streams 64 --out "$OUT/worker_faults_1.5b" --log-dir /tmp/logs-hub26
    ;;
  ttft26)  # issue 26: lylm --workers 4 vs vllm serve --api-server-count 4, rounds alternating
    python3 "$B/workers_vs_vllm.py" --device gpu --model-dir "$MODELS/1.5b" --shape qwen2.5-1.5b --arms lylm:4,vllm:4 \
      --grid 64x256,256x1024,256x2048@8 --rounds 3 --min-rounds 3 --budget-s "$(($(left) - 40))" \
      --out "$OUT/workers_vs_vllm_1.5b_i26" --log-dir /tmp/logs-ttft26
    ;;
  ttft26s)  # issue 26, on a short device budget: the two cells run 1 missed, 3 rounds (at least 2)
    python3 "$B/workers_vs_vllm.py" --device gpu --model-dir "$MODELS/1.5b" --shape qwen2.5-1.5b --arms lylm:4,vllm:4 \
      --grid 64x256,256x2048@8 --rounds 3 --min-rounds 2 --budget-s "$(($(left) - 30))" \
      --out "$OUT/workers_vs_vllm_1.5b_i26" --log-dir /tmp/logs-ttft26
    ;;
  kv29)  # issue 29: precise prefix routing from KV events on one GPU (two engines on GPU 0)
    timeout "$(($(left) - 20))" python3 "$B/prefix_real.py" --device gpu --model-dir "$MODELS/1.5b" --shape qwen2.5-1.5b \
      --balancers kv_aware,least_outstanding,prefix_aware --rounds "${ROUNDS:-3}" --requests 240 \
      --out "$OUT/prefix_real_kv_1.5b"
    ;;
  *) echo "unknown call $CALL"; exit 2 ;;
esac
rc=$?
echo "$CALL finished with status $rc after ${SECONDS} s"
nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv
exit $rc

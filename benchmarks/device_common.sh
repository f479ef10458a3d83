# Sourced by the device scripts (forgetting/device.sh, frameworks_gpu/device.sh): what both do before starting runs.

warn_if_gpu_in_use() {  # warn before starting runs on a GPU that other runs already fill. On 2026-12-06 the 1.5B's
  # framework rows started beside the frontier's 35 processes on an 80 GB H100, and most of both ran out of memory.
  local used
  used=$(nvidia-smi --query-gpu=memory.used,memory.total --format=csv,noheader,nounits 2>/dev/null \
    | awk -F', ' 'NR == 1 {print int(100 * $1 / $2)}')
  [ "${used:-0}" -gt 25 ] && echo "warning: ${used}% of the GPU's memory is already in use; runs started now may" \
    "run out of memory (wait for the others, or start fewer at a time)" >&2
  return 0
}

code_snapshot() {  # code_snapshot DIR: a copy of the code for detached runs to import from. Every later call copies
  # the working tree over the repo, and a run that imported a module while that copy was under way failed with
  # ModuleNotFoundError (2026-12-06); a plugin imports the core only once the model has loaded.
  mkdir -p "$1" && cp -r lora_null_core plugins benchmarks pyproject.toml "$1"/
}

gpu_gate() {  # gpu_gate GIB: hold a detached run back until GIB of the GPU's memory is free and the last run let
  # through has had 45 s to take its own, one run at a time (a guard for runs that share the GPU with other work; the
  # number at a time is jobs_that_fit's). A run goes ahead anyway when no other run is on the GPU.
  (
    flock 9
    while :; do
      local free last
      free=$(nvidia-smi --query-gpu=memory.free --format=csv,noheader,nounits | head -1)
      last=$(cat /tmp/gpu_gate.last 2>/dev/null || echo 0)
      if [ $(( $(date +%s) - last )) -ge 45 ]; then
        [ "${free:-0}" -ge $(( $1 * 1024 )) ] && break
        pgrep -f "^python3 -m lora_null_bench" > /dev/null || break
      fi
      sleep 5
    done
    date +%s > /tmp/gpu_gate.last
  ) 9> /tmp/gpu_gate.lock
}

jobs_that_fit() {  # jobs_that_fit JOBS GIB: JOBS, or fewer where JOBS runs of GIB each would not fit the GPU. On
  # 2026-12-07 five 1.5B processes shared an 80 GB H100 and nine of fourteen ran out of memory: each grows to 14-26 GiB
  # well after its start, so what is free at a start says little about what the runs beside it will take.
  local total
  total=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)
  [ -n "$total" ] || { echo "$1"; return; }
  local fit=$(( total / 1024 / $2 ))
  [ $fit -lt 1 ] && fit=1
  [ $fit -lt $1 ] && echo $fit || echo "$1"
}

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

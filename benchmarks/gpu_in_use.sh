# Sourced by the device scripts: warn before starting runs on a GPU that other runs already fill. On 2026-12-06 the
# 1.5B's framework rows started beside the frontier's 35 processes on an 80 GB H100, and most of both ran out of memory.
warn_if_gpu_in_use() {
  local used
  used=$(nvidia-smi --query-gpu=memory.used,memory.total --format=csv,noheader,nounits 2>/dev/null \
    | awk -F', ' 'NR == 1 {print int(100 * $1 / $2)}')
  [ "${used:-0}" -gt 25 ] && echo "warning: ${used}% of the GPU's memory is already in use; runs started now may" \
    "run out of memory (wait for the others, or start fewer at a time)" >&2
  return 0
}

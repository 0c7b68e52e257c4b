#!/usr/bin/env bash
# `make demo`: start the control plane (it starts and owns a local Ray head), submit the demo job
# through its REST API with the forkrl CLI, follow it live, print the run summary, stop the service.
#   CONFIG=examples/demo.yaml ARGS="--set trainer.steps=5" bash scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
CONFIG="${CONFIG:-examples/demo.yaml}"
export FORKRL_DATA_DIR="${FORKRL_DATA_DIR:-$PWD/runs/service}"
export FORKRL_RUNS_DIR="${FORKRL_RUNS_DIR:-$PWD/runs}"
export FORKRL_PORT="${FORKRL_PORT:-$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
export FORKRL_URL="http://127.0.0.1:$FORKRL_PORT"
unset RAY_ADDRESS FORKRL_RAY_ADDRESS
mkdir -p "$FORKRL_DATA_DIR"
t0=$(date +%s.%N)
since() { $PY -c "import sys, time; print(f'{time.time() - float(sys.argv[1]):.1f}')" "$1"; }
log="$FORKRL_DATA_DIR/service.log"

echo "demo: starting the control plane on $FORKRL_URL (log: $log)"
$PY -m service >>"$log" 2>&1 &
svc=$!
trap 'kill -TERM $svc 2>/dev/null; wait $svc 2>/dev/null || true' EXIT
for _ in $(seq 1 240); do
  if curl -fs "$FORKRL_URL/readyz" >/dev/null 2>&1; then break; fi
  if ! kill -0 $svc 2>/dev/null; then echo "demo: the service exited; see $log" >&2; tail -20 "$log" >&2; exit 1; fi
  sleep 1
done
curl -fs "$FORKRL_URL/readyz" >/dev/null || { echo "demo: the service is not ready after 240 s; see $log" >&2; exit 1; }
echo "demo: control plane ready after $(since "$t0") s"
echo "demo: dashboard at $FORKRL_URL/ (sign in with the token in $FORKRL_DATA_DIR/admin_token)"

# ARGS holds extra `--set key=value` overrides
rc=0
# shellcheck disable=SC2086
$PY -m service.cli submit "$CONFIG" ${ARGS:-} --follow | tee "$FORKRL_DATA_DIR/last-submit.txt" || rc=$?
job=$(awk '/^submitted /{print $2; exit}' "$FORKRL_DATA_DIR/last-submit.txt")
if [ -n "$job" ]; then
  # the driver's own summary: reward and entropy of the first and last steps, where the files are
  $PY -m service.cli logs "$job" | sed -n '/== forkrl run summary ==/,/^Hugging Face export/p'
  # start-up, from `make demo` to the first training step (the driver's part is in the summary's start-up line)
  $PY - "$FORKRL_RUNS_DIR/$job/summary.json" "$t0" <<'PYEOF'
import json, pathlib, sys
path = pathlib.Path(sys.argv[1])
t = (json.loads(path.read_text()).get("startup_s") or {}) if path.is_file() else {}
if "first_step_unix" in t:
    print(f"demo: first step {t['first_step_unix'] - float(sys.argv[2]):.1f} s after make demo started")
PYEOF
  echo "demo: job $job; REST API was $FORKRL_URL; service data in $FORKRL_DATA_DIR"
fi
exit $rc

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
echo "demo: dashboard at $FORKRL_URL/ (sign in with the token in $FORKRL_DATA_DIR/admin_token)"

# ARGS holds extra `--set key=value` overrides
rc=0
# shellcheck disable=SC2086
$PY -m service.cli submit "$CONFIG" ${ARGS:-} --follow | tee "$FORKRL_DATA_DIR/last-submit.txt" || rc=$?
job=$(awk '/^submitted /{print $2; exit}' "$FORKRL_DATA_DIR/last-submit.txt")
if [ -n "$job" ]; then
  # the driver's own summary: reward and entropy of the first and last steps, where the files are
  $PY -m service.cli logs "$job" | sed -n '/== forkrl run summary ==/,/^Hugging Face export/p'
  echo "demo: job $job; REST API was $FORKRL_URL; service data in $FORKRL_DATA_DIR"
fi
exit $rc

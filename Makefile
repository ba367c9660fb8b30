# osteoplan: two commands on a fresh machine — `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
SAMPLE ?= data_samples/phantom01
OUT ?= out

.PHONY: venv run test test-fast bench bench-gpu train train-gpu evaluate samples fuzz lint clean

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (or set PYTHON=...)"; exit 2; }
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python requirements.txt requirements-dev.txt pyproject.toml
	$(BIN)/pip install -q --upgrade pip >/dev/null
	$(BIN)/pip install -q -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps -e .
	@touch $@

venv: $(VENV)/.installed

## The main job: analyse the sample study shipped in data_samples/
run: venv
	$(BIN)/osteoplan run $(SAMPLE) -o $(OUT)

test: venv
	$(BIN)/python -m pytest -q

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow"

## Write fresh phantom studies (data_samples/ holds one made this way)
samples: venv
	$(BIN)/osteoplan samples -o $(OUT)/samples -n 3

## Reproduce the shipped weights: stage 1 (phantoms), then stage 2 (phantoms + real CT with inserted lesions)
train: venv
	$(BIN)/osteoplan train --config configs/train.yaml
	$(BIN)/osteoplan train --config configs/train_real.yaml

## Stages 3, 4 and 6 on a CUDA GPU (configs/train_gpu.yaml fine-tunes stage 2's run, configs/train_gpu_ft.yaml
## fine-tunes stage 3's and exports 0.3.0, configs/train_gpu_ft6.yaml fine-tunes 0.3.0 and exports the shipped
## WiSE-FT mix 0.4.0; stage 5 was not shipped). Runs, checkpoints and TensorBoard logs: runs/.
train-gpu: venv
	$(BIN)/osteoplan train --config configs/train_gpu.yaml --no-resume
	$(BIN)/osteoplan train --config configs/train_gpu_ft.yaml --no-resume
	$(BIN)/osteoplan train --config configs/train_gpu_ft6.yaml --no-resume

evaluate: venv
	$(BIN)/python scripts/evaluate_real.py

bench: venv
	$(BIN)/python scripts/bench.py
	$(BIN)/python scripts/bench_distance.py
	$(BIN)/python scripts/bench_batch.py --n 6

bench-gpu: venv
	$(BIN)/python scripts/bench.py --device cuda --size bench400 --repeat 5 --warmup
	$(BIN)/python scripts/bench_batch.py --device cuda --study out/bench/bench400/phantom01 --copies 48 --workers 6

fuzz: venv
	$(BIN)/python scripts/fuzz_ingest.py --seconds 60

lint: venv
	$(BIN)/python -m compileall -q pipeline

clean:
	rm -rf $(OUT) .pytest_cache

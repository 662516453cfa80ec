# Two commands on a fresh machine: `make demo` (export + run + validate the built-in VILA) and
# `make test`. Both create .venv on first use. torch is pinned to the CPU wheel that lies on disk;
# an unpinned torch would pull a multi-GB CUDA build.
PY := .venv/bin/python
STAMP := .venv/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
CHROMIUM := /usr/bin/chromium

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,serve]'
	rm -f .venv/.installed-*; touch $@

# The HTML parity report's test opens the page in Debian's headless chromium (CI runs as root).
$(CHROMIUM):
	DEBIAN_FRONTEND=noninteractive apt-get update -q
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium

.PHONY: setup demo test
setup: $(STAMP)

demo: $(STAMP)
	$(PY) export.py --model vila

test: $(STAMP) $(CHROMIUM)
	$(PY) -m pytest -q -n 2 tests

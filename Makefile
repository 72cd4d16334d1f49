# stylekit — `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.stylekit-installed
OUT    ?= out

.PHONY: install demo test gimp-test bench lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## demo: install, then stylise a built-in photo with a built-in painting and say where it went
demo: install
	$(BIN)/python -m stylekit.examples $(OUT)
	$(BIN)/stylekit apply $(OUT)/example-photo.png --style $(OUT)/example-painting.png \
		-o $(OUT)/demo.png --size 256 --steps 100 --progress bar
	@echo "demo result: $(abspath $(OUT))/demo.png"

## test: install, then run the whole test suite (CPU, no network)
test: install
	$(BIN)/python -m pytest -q -m "not gimp"

## gimp-test: the plug-in in a real headless GIMP 3 (root; builds a Debian trixie chroot once, cached
## outside the clone in $(GIMP_ROOT))
GIMP_ROOT ?= /var/cache/stylekit/gimp3-root
gimp-test: install
	sh plugins/gimp/tests/make-chroot.sh $(GIMP_ROOT)
	STYLEKIT_GIMP_ROOT=$(GIMP_ROOT) STYLEKIT_GIMP_REQUIRED=1 $(BIN)/python -m pytest -q -m gimp tests/test_gimp.py

## bench: side-by-side benchmarks; results go to docs/benchmarks.md and bench/results/
bench: install
	$(BIN)/python -m bench.run
	$(BIN)/python -m bench.hotfolder
	$(BIN)/python -m bench.onnx_vs_torch

lint: install
	$(BIN)/ruff check stylekit pipeline tests bench plugins

clean:
	rm -rf $(OUT) .pytest_cache .ruff_cache

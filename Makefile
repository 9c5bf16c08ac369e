# Entry points for users and CI. Everything installs into a virtual environment ($(VENV)).
# torch is pinned to the CPU build on local disk; the extension is built against it with
# --no-build-isolation (an isolated build would pull a multi-GB CUDA torch).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
OUT ?= runs/demo
PYTEST_ARGS ?=

.PHONY: venv install demo test bench check-cuda clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q "scikit-build-core>=0.10" "pybind11>=2.12" cmake ninja

venv: $(BIN)/python

install: venv
	$(BIN)/pip install -q --no-build-isolation ".[test,images]"

demo: install
	$(BIN)/molrg demo --out $(OUT)

test: install
	@set +e; $(BIN)/pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: treating as a failure"; exit 1; fi; \
	exit $$rc

# the entry point, not `python -m benchmarks`: from the repository root that would import the
# source tree's molrg_ext (no built extension there) instead of the installed one
bench: install
	$(BIN)/molrg bench

check-cuda:
	bash scripts/check_cuda.sh

clean:
	rm -rf build $(VENV) molrg_ext/_C*.so molrg_ext/_cpuid*.so

# make test: set up .venv (reused while current), build the extension, run the whole suite.
# make demo: set up, then run the main end-to-end unlearning job with a readable report.
# Every pip install takes the lock constraints.txt (-c), so a fresh clone installs what CI tested.
PY      := .venv/bin/python
LOCK    := constraints.txt
PIP     := $(PY) -m pip --disable-pip-version-check -q
INSTALL := $(PIP) install -c $(LOCK)
STAMP   := .venv/.installed
EXT     := unlearn_fast/_C.stamp
CSRC    := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')

# The suite's second pass (test-float-paths): MKL's generic code path and ATen's non-vectorised kernels round
# differently from the host's native ones, so a result that depends on the host's instruction set fails here on
# any machine (issue 14: a stopping rule flipped on an Intel host only).
# Its own inductor cache: torch's FX graph cache key ignores ATEN_CPU_CAPABILITY, so a graph cached by the
# native pass (AVX2 code) is recompiled without AVX2 flags here and fails to build (torch 2.13).
FLOAT_PATHS := MKL_CBWR=COMPATIBLE ATEN_CPU_CAPABILITY=default TORCHINDUCTOR_CACHE_DIR=$(CURDIR)/build/inductor-float-paths
SUITE   := $(PY) -m pytest tests --ignore=tests/triton -q

.PHONY: test test-float-paths demo build bench nvcc-check clean lock

$(STAMP): pyproject.toml setup.py $(LOCK)
	test -x $(PY) || python3 -m venv .venv
	$(INSTALL) --upgrade pip setuptools wheel
	# The CPU wheel keeps set-up short (torch's version comes from the lock; a matching torch is kept).
	$(INSTALL) torch
	$(INSTALL) pybind11 ninja numpy
	# the test extra plus the optional integrations' frameworks (tests/test_lightning.py needs lightning)
	UNLEARN_FAST_SKIP_EXT=1 $(INSTALL) --no-build-isolation -e ".[test,lightning]"
	touch $(STAMP)

# Rewrites the lock from the working .venv (after an intended upgrade; then run make test).
lock:
	{ sed -n '1,/^# --- pins/p' $(LOCK); $(PIP) freeze --all --exclude-editable | grep -v '^-e' | sed 's/^torch==\([^+]*\)+.*/torch==\1/'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)

$(EXT): $(STAMP) $(CSRC)
	MAX_JOBS=2 $(PY) setup.py -q build_ext --inplace
	touch $(EXT)

build: $(EXT)

test: build
	$(PY) -c "import unlearn_fast as uf, json; print(json.dumps(uf.backends(), indent=1))"
	$(SUITE)
	TRITON_INTERPRET=1 $(PY) -m pytest tests/triton -q
	bash tests/nvcc_check.sh
	$(MAKE) --no-print-directory test-float-paths

test-float-paths: build
	$(FLOAT_PATHS) $(SUITE)

demo: build
	$(PY) benchmarks/end_to_end.py --quick

bench: build
	$(PY) benchmarks/ops_speed.py

clean:
	rm -rf build unlearn_fast/_C*.so $(EXT)

# make test: set up .venv (reused while current), build the extension, run the whole suite.
# make demo: set up, then run the main end-to-end unlearning job with a readable report.
PY      := .venv/bin/python
PIP     := $(PY) -m pip --disable-pip-version-check -q
STAMP   := .venv/.installed
EXT     := unlearn_fast/_C.stamp
CSRC    := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')

.PHONY: test demo build bench nvcc-check clean

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install --upgrade pip setuptools wheel
	# The CPU wheel keeps set-up short; an existing torch in .venv is kept.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install pybind11 ninja numpy
	UNLEARN_FAST_SKIP_EXT=1 $(PIP) install --no-build-isolation -e ".[test]"
	touch $(STAMP)

$(EXT): $(STAMP) $(CSRC)
	MAX_JOBS=2 $(PY) setup.py -q build_ext --inplace
	touch $(EXT)

build: $(EXT)

test: build
	$(PY) -c "import unlearn_fast as uf, json; print(json.dumps(uf.backends(), indent=1))"
	$(PY) -m pytest tests --ignore=tests/triton -q
	TRITON_INTERPRET=1 $(PY) -m pytest tests/triton -q
	bash tests/nvcc_check.sh

demo: build
	$(PY) benchmarks/end_to_end.py --quick

bench: build
	$(PY) benchmarks/ops_speed.py

clean:
	rm -rf build unlearn_fast/_C*.so $(EXT)

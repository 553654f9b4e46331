# Two commands do everything: `make reproduce` and `make test`.
#   make reproduce [PROFILE=smoke|default|paper] [MASSIVE_DIR=path]
#   make test
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= default
# Where MASSIVE 1.1 lies (1.1/data/<locale>.jsonl or the official tarball); downloaded there if absent.
MASSIVE_DIR ?= data/massive
export MASSIVE_DIR

.PHONY: reproduce test unit unit-avx2 nbval notebook-results venv clean-runs

venv: $(VENV)/.installed

# torch first, pinned: an unpinned torch would pull a CUDA build of several GB.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

reproduce: venv
	$(PY) -m compactnlu.reproduce --profile $(PROFILE)

test: unit unit-avx2 nbval notebook-results

# The notebooks' recorded results are asserted after nbval (notebook-results), not from an older run.
unit: venv
	$(PY) -m pytest tests --ignore=tests/test_notebook_results.py

# The quantization tests again as on a CPU with AVX2 only (no AVX-512, no VNNI), whatever this
# one has: torch's vector kernels (ATEN_CPU_CAPABILITY), oneDNN (ONEDNN_MAX_CPU_ISA) and fbgemm,
# torch's int8 linear kernels, which saturate without VNNI (FBGEMM_ENABLE_INSTRUCTIONS; the
# other two do not reach it), and MKL, torch's float matrix multiply (MKL_ENABLE_INSTRUCTIONS). torch._int_mm goes to oneDNN only where cpuinfo sees VNNI, so the
# cap also gives it oneDNN's saturating AVX2 int8 kernel, as for anyone who caps oneDNN: int8
# code must not take _int_mm to be exact. ONNX Runtime has no such switch:
# COMPACTNLU_ASSUME_NO_VNNI=1 makes compactnlu.cpu.has_vnni() answer False, so the int8 graph
# is quantized as for such a CPU. Takes about a minute.
AVX2_ONLY := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 FBGEMM_ENABLE_INSTRUCTIONS=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 COMPACTNLU_ASSUME_NO_VNNI=1
QUANT_TESTS := tests/test_cpu.py tests/test_kernels.py tests/test_quant.py tests/test_static.py tests/test_dynamic.py tests/test_quant_registry.py tests/test_precision.py tests/test_pcptq.py tests/test_onnx_runtime.py tests/test_onnx_nbits.py

unit-avx2: venv
	$(AVX2_ONLY) $(PY) -m pytest -p no:cacheprovider $(QUANT_TESTS)

# Every numbered notebook, executed top to bottom on the smoke profile; each records its key
# numbers in runs/smoke/records (compactnlu.notebook.record), cleared first so none is left from before.
nbval: venv
	rm -rf runs/smoke/records
	COMPACTNLU_PROFILE=smoke $(PY) -m pytest --nbval-lax -p no:cacheprovider notebooks

# What those runs recorded, asserted within the smoke profile's tolerances; a missing record fails.
notebook-results: nbval
	COMPACTNLU_REQUIRE_RECORDS=1 $(PY) -m pytest -p no:cacheprovider tests/test_notebook_results.py

clean-runs:
	rm -rf runs

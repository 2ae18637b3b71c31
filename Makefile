# The two commands a newcomer needs:
#   make demo   set everything up, then run the main job (render a built-in scene, time every backend)
#   make test   set everything up, then run the test suite (what .ci/run calls)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The build imports torch, so torch and the build tools are installed before the package itself.
# torch and torchvision are pinned as a pair (lpips, open_clip and torchmetrics import torchvision).
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
BUILD_DEPS := $(TORCH_PIN) setuptools wheel ninja pybind11 numpy

.PHONY: setup demo test bench cmake-check clean gpu-check browser
setup: $(VENV)/.g3dr-installed

$(VENV)/.g3dr-installed: pyproject.toml setup.py csrc/sources.py $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' 2>/dev/null)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(BUILD_DEPS)
	$(PIP) install -q --no-build-isolation -e ".[test,all]" $(TORCH_PIN)
	$(PY) -c "import g3dr_kernels as k; print('backends:', {n: v['available'] for n, v in k.backends().items()})"
	touch $@

demo: setup
	$(VENV)/bin/g3dr demo

# G3DR_REQUIRE_BACKENDS=cpu: the build above always makes the C++ CPU kernels, so their absence is a
# failure (tests/test_api.py), not a row of skips. -n 2 (pytest-xdist): two workers, so an abort in
# an interpreted Triton kernel fails that one test (the worker is replaced) instead of the whole run.
test: setup cmake-check browser
	G3DR_REQUIRE_BACKENDS=cpu HF_HUB_OFFLINE=1 $(PY) -m pytest tests -q -n 2

bench: setup
	$(PIP) install -q matplotlib
	$(PY) -m pytest benchmarks/bench_sample.py benchmarks/bench_composite.py benchmarks/bench_render.py -q \
	  --benchmark-only -o python_files='bench_*.py'
	PYTHONPATH=$(CURDIR) $(PY) benchmarks/bench_train.py --preset small --batch 4
	PYTHONPATH=$(CURDIR) $(PY) benchmarks/bench_infer.py
	$(PY) benchmarks/plot.py

# tests/test_viewer.py drives headless Chromium (WebGL2 in software). Installs Debian's package when it is
# missing and we are root with apt-get; never fails the build (without a browser those tests skip, saying so).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	      echo "installing chromium for the viewer tests (apt-get)"; \
	      (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium) >/dev/null 2>&1 || \
	      echo "could not install chromium: the viewer tests will skip (apt-get install -y chromium)"; \
	    else echo "no chromium: the viewer tests will skip (apt-get install -y chromium)"; fi; }

# Builds the extension a second way, through CMakeLists.txt, so that file cannot rot.
cmake-check: setup
	cmake -S . -B build-cmake -G Ninja -DPython3_EXECUTABLE=$(abspath $(PY)) \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
	  -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV)/bin/ninja) > build-cmake.log 2>&1 || (cat build-cmake.log; exit 1)
	cmake --build build-cmake >> build-cmake.log 2>&1 || (cat build-cmake.log; exit 1)
	@echo "cmake build OK (build-cmake/)"

# One-shot GPU check on a machine with python, torch, triton and nvcc installed and no network:
# builds in place for the local GPU only, runs the GPU tests and benchmarks, writes results to OUT.
# Uses the python on PATH (no venv, no pip); GPU_PYTHON=... to choose another.
GPU_PYTHON ?= python3
gpu-check:
	@test -n "$(OUT)" || { echo "usage: make gpu-check OUT=DIR"; exit 2; }
	$(GPU_PYTHON) benchmarks/gpu_check.py --out "$(OUT)"

clean:
	rm -rf build build-cmake build-cmake.log *.egg-info g3dr_kernels/_C*.so

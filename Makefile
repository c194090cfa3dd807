# radixlm: two commands on a fresh machine.
#   make serve   start the server on the demo model (builds .venv, and trains the demo pair on first use:
#                ~10 minutes on 2 idle CPU cores, cached in models/demo-pair)
#   make test    lint (ruff) and run the test suite (builds .venv if needed)
#   make serve-spec   the same model, with speculative decoding (the pair's draft, STANDALONE)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PEERS := $(VENV)/.peers
DEMO_PAIR ?= models/demo-pair
DEMO_MODEL ?= $(DEMO_PAIR)/target
DEMO_BUDGET ?= 600
PORT ?= 30000

.PHONY: setup lint test test-all serve serve-spec demo bench clean peers-llama bench-cpu-peers

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@# CPU machines take the CPU wheel of torch (a looser pin would pull a multi-GB CUDA build).
	@if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q torch; \
	 else $(BIN)/pip install -q torch==2.13.0; fi
	$(BIN)/pip install -q -e '.[server,test]'
	touch $(STAMP)

# SGLang's router and frontend, the peers the tests check radixlm against (best effort: their tests skip)
$(PEERS): $(STAMP)
	$(BIN)/pip install -q -e '.[peers]' && $(BIN)/pip install -q --no-deps sglang==0.5.23 \
	 || echo "SGLang peers not installed: their tests will skip"
	touch $(PEERS)

setup: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check radixlm tests

test: lint $(PEERS)
	$(BIN)/python -m pytest -q

# The trained demo pair (radixlm.tools.train_demo writes each model's config.json last, so its presence
# means a complete checkpoint); DEMO_BUDGET caps the training's wall-clock seconds.
$(DEMO_PAIR)/target/config.json $(DEMO_PAIR)/draft/config.json &: | $(STAMP)
	$(BIN)/python -m radixlm.tools.train_demo --out $(DEMO_PAIR) --time-budget $(DEMO_BUDGET)

# A DEMO_MODEL outside the pair: a random-weight tiny checkpoint, as the tests use
$(filter-out $(DEMO_PAIR)/%,$(DEMO_MODEL)/config.json): | $(STAMP)
	$(BIN)/python -m radixlm.tools.make_tiny_model $(DEMO_MODEL) --arch qwen2 --size small

serve: $(DEMO_MODEL)/config.json
	$(BIN)/python -m radixlm.launch_server --model-path $(DEMO_MODEL) --port $(PORT)

serve-spec: $(DEMO_PAIR)/target/config.json $(DEMO_PAIR)/draft/config.json
	$(BIN)/python -m radixlm.launch_server --model-path $(DEMO_PAIR)/target --port $(PORT) \
	  --speculative-algorithm STANDALONE --speculative-draft-model-path $(DEMO_PAIR)/draft --speculative-num-steps 3

demo: $(DEMO_MODEL)/config.json
	$(BIN)/python -m radixlm.demo --model-path $(DEMO_MODEL)

bench: $(DEMO_MODEL)/config.json
	$(BIN)/python -m radixlm.bench_offline --model-path $(DEMO_MODEL)

# llama.cpp's llama-server (CPU, native arch) from the llama-cpp-python sdist, cached under .peers/llama.cpp/:
# the peer of `bench-cpu-peers` (slow on 2 cores; `make test` does not build it: its tests skip without it)
peers-llama:
	PY=$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PY)) bash scripts/build_llama_server.sh

# radixlm vs llama.cpp vs HF transformers on this CPU (docs/benchmarks.md, "CPU: radixlm vs llama.cpp vs HF")
bench-cpu-peers: peers-llama $(STAMP)
	$(BIN)/python -m radixlm.bench.cpu_peers --output-md cpu_peers.md --output-json cpu_peers.json

clean:
	rm -rf $(VENV) models .pytest_cache

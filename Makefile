# The README's commands. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CKPT   ?= weights/demo
REPO   ?= build/model_repository_cpu
export HTTP_PORT METRICS_PORT GRPC_PORT

.PHONY: demo test install weights build build-gpu serve eval bench style lint clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/.installed ## virtual environment with every extra

weights: install ## the demo checkpoint (trains it with train/configs/demo.yaml if absent)
	@if [ ! -f $(CKPT)/cxr_sr.json ]; then \
	  echo "no $(CKPT): training the demo model (~15 min on 2 CPU cores)"; \
	  $(BIN)/python -m cxr_sr.train.loop --config train/configs/demo.yaml --out runs/demo && \
	  mkdir -p $(dir $(CKPT)) && cp -r runs/demo/checkpoint $(CKPT); fi

build: weights ## cpu-target Triton repository in $(REPO)
	$(BIN)/python -m cxr_sr.builders.build --checkpoint $(CKPT) --target cpu --out $(REPO)

build-gpu: weights ## gpu-target repository (TensorRT UNet where TensorRT is importable)
	$(BIN)/python -m cxr_sr.builders.build --checkpoint $(CKPT) --target gpu --out build/model_repository_gpu

serve: build ## tritonserver on 127.0.0.1 (HTTP_PORT, GRPC_PORT, METRICS_PORT)
	$(BIN)/python -m cxr_sr.builders.serve --repository $(REPO)

demo: build ## serve, super-resolve the bundled radiograph, print and save the figures
	$(BIN)/python -m cxr_sr.builders.demo --repository $(REPO) --checkpoint $(CKPT)

test: install ## the test suite (integration tests start a real tritonserver)
	$(BIN)/python -m pytest -q

eval: weights ## offline evaluation on the held-out set -> outputs/eval.json
	$(BIN)/python -m cxr_sr.train.evaluate --checkpoint $(CKPT) --out outputs/eval.json \
	  --plot outputs/quality_vs_steps.png

bench: build ## perf_analyzer sweep and stage timings -> outputs/bench_*.json
	$(BIN)/python -m benchmarks.perf --repository $(REPO)
	$(BIN)/python -m benchmarks.stages --repository $(REPO)

style: install
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf build outputs

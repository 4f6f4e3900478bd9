# The README's commands. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CKPT   ?= weights/demo
REPO   ?= build/model_repository_cpu
# pip installs use the pinned versions (regenerate with `make constraints`)
PIP_INSTALL := $(BIN)/pip install -q -c constraints.txt
export HTTP_PORT METRICS_PORT GRPC_PORT

.PHONY: demo test test-fast install venv system constraints weights build build-gpu serve \
	viewer eval bench perf bench-more soak style lint clean

# Python packages, every extra, pinned; re-installed when pyproject.toml or the pins change.
$(BIN)/.installed: pyproject.toml constraints.txt
	@$(PYTHON) -c "import ensurepip" 2>/dev/null || bash scripts/system-packages.sh --packages python3-venv
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(PIP_INSTALL) -e ".[dev]"
	touch $@

venv: $(BIN)/.installed ## virtual environment with every extra (what the demo needs)

system: ## Debian packages in system-packages.txt (apt-get as root; otherwise prints the command)
	@bash scripts/system-packages.sh system-packages.txt

install: venv system ## everything the tests and benchmarks need

constraints: venv ## regenerate constraints.txt from the working venv
	{ sed -n '1,3p' constraints.txt; $(BIN)/pip freeze --exclude-editable \
	  | sed -E 's/^(torch==[^+]+)\+.*/\1/'; } > constraints.txt.new && mv constraints.txt.new constraints.txt

weights: venv ## the committed checkpoint (weights/demo: the NIH model of train/configs/nih.yaml); stops if CKPT is absent
	@if [ ! -f $(CKPT)/cxr_sr.json ]; then \
	  echo "no checkpoint in $(CKPT). The committed one is weights/demo; to train one on"; \
	  echo "NIH ChestX-ray14: $(BIN)/python -m cxr_sr.train.loop --config train/configs/nih.yaml \\"; \
	  echo "    --set data.root=<folder holding images/> --out runs/nih   (then CKPT=runs/nih/checkpoint)"; \
	  exit 1; fi

build: weights ## cpu-target Triton repository in $(REPO)
	$(BIN)/python -m cxr_sr.builders.build --checkpoint $(CKPT) --target cpu --out $(REPO)

build-gpu: weights ## gpu-target repository (TensorRT UNet where TensorRT is importable)
	$(BIN)/python -m cxr_sr.builders.build --checkpoint $(CKPT) --target gpu --out build/model_repository_gpu

serve: build ## tritonserver on 127.0.0.1 (HTTP_PORT, GRPC_PORT, METRICS_PORT)
	$(BIN)/python -m cxr_sr.builders.serve --repository $(REPO)

# the viewer's port; it talks to Triton on HTTP_PORT and starts one there when none answers
VIEWER_PORT ?= 8090
viewer: build ## browser viewer on 127.0.0.1:$(VIEWER_PORT) (starts tritonserver when none answers on HTTP_PORT)
	$(BIN)/python -m cxr_sr.client.viewer --url 127.0.0.1:$(or $(HTTP_PORT),8000) \
	  --port $(VIEWER_PORT) --serve-repository $(REPO)

demo: build ## serve, super-resolve the bundled radiograph, print and save the figures
	$(BIN)/python -m cxr_sr.builders.demo --repository $(REPO) --checkpoint $(CKPT)

# one torch/OpenMP thread for the tests: their tensors are tiny, and spinning threads on 2
# shared cores made the unit tier 2-5x slower (override with TEST_THREADS=2)
TEST_THREADS ?= 1

test: install ## the full suite, as CI runs it (integration tests start a real tritonserver)
	OMP_NUM_THREADS=$(TEST_THREADS) $(BIN)/python -m pytest -q --durations=15

test-fast: install ## the unit tier: no tritonserver, no training runs or repository builds
	OMP_NUM_THREADS=$(TEST_THREADS) $(BIN)/python -m pytest -q -m "not integration and not slow" --durations=5

# `make eval NIH=/path/to/ChestX-ray14` scores the NIH test split (the folder holding images/)
# instead of the bundled radiograph's held-out region
NIH ?=
eval: weights ## offline evaluation (reference + native scale) -> outputs/eval[_nih].json, plots
	$(BIN)/python -m cxr_sr.train.evaluate --checkpoint $(CKPT) --steps 1,2,4,8 --protocol both \
	  $(if $(NIH),--data nih --root $(NIH) --set val_fraction=0.05 --set test_fraction=0.1 \
	    --set n_eval_images=null --native-steps 1 --native-limit 0 --out outputs/eval_nih.json \
	    --plot outputs/quality_vs_steps_nih.png --figure outputs/eval_nih_zoom.png,\
	  --out outputs/eval.json --plot outputs/quality_vs_steps.png --figure outputs/eval_zoom.png)

bench: build install ## served cxr_sr vs the same graphs in one process, LR 64/128/256, 1 and 4 clients -> outputs/bench.json
	$(BIN)/python -m benchmarks.bench --repository $(REPO) --out outputs/bench.json

perf: build install ## perf_analyzer sweep, concurrency 1-16, LR 64 and 128 -> outputs/perf.csv, outputs/perf.png
	$(BIN)/python -m benchmarks.perf --repository $(REPO) --sizes 64,128 --concurrency 1,2,4,8,16 \
	  --measurement-ms 4000 --max-trials 5

bench-more: build install ## memory by LR size, client tiling, stage timings, VAE cost, int8 vs float32, sampling noise, cpu lanes, batcher waits, overload -> outputs/cost.json, bench_stages.json, vae_cost.json, quantize.json, noise.json, lanes.json, batcher_waits.json, overload.json
	$(BIN)/python -m benchmarks.cost --repository $(REPO) --out outputs/cost.json
	$(BIN)/python -m benchmarks.stages --repository $(REPO)
	$(BIN)/python -m benchmarks.vae_cost --checkpoint $(CKPT) --out outputs/vae_cost.json
	$(BIN)/python -m benchmarks.quantize --repository $(REPO) --out outputs/quantize.json
	$(BIN)/python -m benchmarks.noise --out outputs/noise.json
	$(BIN)/python -m benchmarks.lanes --repository $(REPO) --out outputs/lanes.json
	$(BIN)/python -m benchmarks.batcher_waits --repository $(REPO) --out outputs/batcher_waits.json
	$(BIN)/python -m benchmarks.overload --repository $(REPO) --out outputs/overload.json

soak: build install ## perf_analyzer at concurrency 8 for 3 min, mixed LR sizes, memory of every process -> outputs/soak.json
	$(BIN)/python -m benchmarks.soak --repository $(REPO) --out outputs/soak.json

style: venv
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

lint: venv
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf build outputs

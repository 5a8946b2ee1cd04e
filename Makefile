# The two commands a fresh machine needs: `make train` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= dev,wandb,onnx,tensorboard,serve

.PHONY: train test venv clean
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

venv: $(VENV)/.installed

train: venv  ## train the default CNN on the built-in MNIST sample (about 12 s of training on 2 cores)
	$(VENV)/bin/hwr train configs/default.yaml train.resume=auto $(ARGS)

test: venv  ## the whole test suite, multi-process and SLURM tests included
	$(PY) -m pytest -q $(ARGS)

clean:
	rm -rf runs .pytest_cache

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-all lint bench
install: $(STAMP)

$(STAMP): pyproject.toml requirements/base.txt requirements/remote.txt requirements/bench.txt requirements/ray.txt requirements/nodeps.txt tools/install_torch_cpu.sh tools/torch-constraint.txt
	test -x $(PY) || python3 -m venv $(VENV)
	tools/install_torch_cpu.sh $(PY)
	$(PY) -m pip install -q -c tools/torch-constraint.txt -r requirements/base.txt -r requirements/remote.txt -r requirements/bench.txt
	$(PY) -m pip install -q -c tools/torch-constraint.txt -r requirements/ray.txt
	$(PY) -c "import torch; assert not torch.version.cuda, torch.__version__"
	$(PY) -m pip install -q --no-deps -r requirements/nodeps.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fastmix-data demo

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

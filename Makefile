# make demo  - set up .venv if needed, then run notebooks 01-05 on the offline demo profile
# make test  - set up .venv if needed, then run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU wheel here; on a CUDA machine use e.g. TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH  ?= torch==2.13.0
RUN    ?= demo
PYTEST_ARGS ?= -n 2

.PHONY: env demo test lab clean-demo

env: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	@# On a CUDA torch, the course scorer's parts too: torchvision built for that torch (from the same index), open_clip
	if $(BIN)/python -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)"; then \
	  $(BIN)/pip install -q --no-deps "torchvision==$$($(BIN)/python -c "import torch; print('0.%d.*' % (int(torch.__version__.split('.')[1]) + 15))")" $(wordlist 2,99,$(TORCH)) && \
	  $(BIN)/pip install -q open_clip_torch; fi
	touch $@

demo: env
	$(BIN)/python -m helpers.runs --profile demo --run-name $(RUN)

test: env
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Rooted at the project so the executed copies in outputs/runs/<run>/notebooks/ open too; starts in notebooks/.
# Kernels get CurveZMQ keys: ipykernel warns "running over TCP without encryption" otherwise.
lab: env
	$(BIN)/jupyter lab --ServerApp.root_dir=. --LabApp.default_url=/lab/tree/notebooks \
	  --KernelManager.transport_encryption=auto

clean-demo:
	rm -rf data/demo outputs/runs/$(RUN)

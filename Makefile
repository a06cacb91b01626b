# make demo  - set up .venv if needed, then run notebooks 01-05 on the offline demo profile
# make test  - set up .venv if needed, then run the test suite
# make lock  - regenerate requirements-cpu.lock / requirements-cuda.lock from requirements.txt (+ requirements-cuda.in)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU wheel here; on a CUDA machine use e.g. TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
# (the version must equal requirements.txt's torch pin: tests/test_lock.py checks it)
TORCH  ?= torch==2.13.0
RUN    ?= demo
PYTEST_ARGS ?= -n 2 --maxschedchunk 2
# uv installs the lock in seconds; INSTALLER=pip installs the same lock with pip (also the fallback when uv fails).
# torch is installed by pip with --no-compile, as uv installs (bytecode is written at first import): ~40 s less here.
INSTALLER  ?= uv
UV_VERSION ?= 0.13.8
UV         := $(BIN)/uv
# Locks are resolved for Linux x86_64, CPython 3.11 (3.11.0 and up); LOCK_ARGS=--upgrade (or
# "--upgrade-package diffusers") moves pins forward, without it `make lock` keeps every pin it can.
LOCK_FLAGS  = --quiet --python-version 3.11 --python-platform x86_64-manylinux_2_28 --custom-compile-command "make lock" $(LOCK_ARGS)
# Where the CPU lock finds torch's CPU wheel (+cpu): this host's wheel folder if it has one, else PyTorch's CPU index page
TORCH_CPU_LINKS ?= $(if $(wildcard /opt/wheels/torch-*+cpu-*.whl),/opt/wheels,https://download.pytorch.org/whl/cpu/torch/)

.PHONY: env lock demo test lab clean-demo

env: $(VENV)/.installed

$(VENV)/.installed: $(wildcard requirements-cpu.lock requirements-cuda.lock) requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q --no-compile $(TORCH)
	@# The lock that fits the torch just installed, less torch itself (pip installed it from $$TORCH; never reinstalled):
	@# CPU torch: requirements-cpu.lock. CUDA torch: requirements-cuda.lock, which adds the course scorer's parts
	@# (torchvision of that torch, open_clip). A TORCH with its own index (cu128) brings its own CUDA libraries
	@# (pinned by that torch wheel), so those lines are left out and torchvision comes from the same index.
	@# A copy without the locks (the hand-in's code/) installs the unpinned requirements.txt instead, and says so.
	if ! $(BIN)/python -W ignore -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)"; then \
	  if [ -f requirements-cpu.lock ]; then grep -v '^torch==' requirements-cpu.lock; \
	  else echo "WARNING: no requirements-cpu.lock: installing the unpinned requirements.txt" >&2; \
	    grep -v '^torch==' requirements.txt; fi > $(VENV)/lock.txt; \
	else \
	  vision=$$(grep -s '^torchvision==' requirements-cuda.lock || $(BIN)/python -W ignore -c \
	    "import torch; print('torchvision==0.%d.*' % (int(torch.__version__.split('.')[1]) + 15))"); \
	  if [ -n "$(wordlist 2,99,$(TORCH))" ]; then \
	    $(BIN)/pip install -q --no-deps "$$vision" $(wordlist 2,99,$(TORCH)) || exit 1; fi; \
	  if [ -f requirements-cuda.lock ]; then \
	    grep -v -E '^(torch$(if $(wordlist 2,99,$(TORCH)),|torchvision|triton|nvidia-[a-z0-9-]*|cuda-[a-z-]*))==' requirements-cuda.lock; \
	  else echo "WARNING: no requirements-cuda.lock: installing the unpinned requirements.txt" >&2; \
	    grep -v '^torch==' requirements.txt; echo "$$vision"; echo open_clip_torch; fi > $(VENV)/lock.txt; \
	fi
	if [ "$(INSTALLER)" = uv ] && { test -x $(UV) || $(BIN)/pip install -q uv==$(UV_VERSION); }; then \
	  $(UV) pip install -q --python $(BIN)/python -r $(VENV)/lock.txt || \
	  { echo "uv failed: installing the same lock with pip"; $(BIN)/pip install -q -r $(VENV)/lock.txt; }; \
	else $(BIN)/pip install -q -r $(VENV)/lock.txt; fi
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $@

# Needs only the network (PyPI, and for the CPU torch TORCH_CPU_LINKS); the venv is used for uv alone.
lock:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	test -x $(UV) || $(BIN)/pip install -q uv==$(UV_VERSION)
	$(UV) pip compile $(LOCK_FLAGS) --find-links $(TORCH_CPU_LINKS) requirements.txt -o requirements-cpu.lock
	$(UV) pip compile $(LOCK_FLAGS) requirements-cuda.in -o requirements-cuda.lock

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

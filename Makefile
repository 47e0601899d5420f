# Set-up and entry points; run from the repository root.
#
#   make install   create .venv, install requirements.txt (once; again when it changes, quietly
#                  unless something is missing) and build the custom ops
#   make custom_ops  the fused Proxy Norm ops: the CPU op (into ~/.cache/proxynorm/, or
#                  $PROXYNORM_CACHE; the library builds it on first use otherwise), and the
#                  IPU op where the Poplar SDK is present (popc on PATH or POPLAR_SDK_ENABLED)
#   make train     install, then train the default config (digits_resnet_group_pn: real
#                  handwritten digits, offline, on the CPU); TRAIN_ARGS="..." adds flags
#   make test      install, add the test tools (requirements-dev.txt), then the fast test
#                  suite (PYTEST_ARGS="..." adds pytest flags)
#   make bench-layer  the layer benchmark: JSON in benchmarks/results/, table in
#                  docs/fused_op.md
#   make bench     the model benchmark (about 15 minutes on 2 cores): training images/s and
#                  saved bytes per image against micro-batch; JSON, table in docs/fused_op.md,
#                  docs/ plot
#   make bench-sync  the synchronisation benchmark under torchrun (2 and 4 gloo processes;
#                  about 20 minutes on 2 cores) and the cost model past this machine: JSON,
#                  tables in docs/scaling.md, docs/ plot
#   make bench-gpu  the layer benchmark (float32 and bfloat16, NCHW and channels_last) and the
#                  model benchmark (float32; bfloat16 in channels_last) on a CUDA GPU (where
#                  one exists): JSON in benchmarks/results/*_cuda*.json
#   make plan      memory per IPU of ResNet-50 and EfficientNet-B0 with BatchNorm and Proxy
#                  Norm (python -m train.plan; about 2 minutes): JSON, table in docs/memory.md
#   make accuracy  the accuracy study on cluttered digits (every norm x micro-batch 2/8/64 x
#                  3 seeds, 24 epochs; about 6 CPU hours, 3 hours on 2 cores; resumable): JSON,
#                  README headline table, the full grid in docs/evidence.md, docs/ figures
#   make analysis  power decomposition of the random network (six norms; Gaussian and
#                  digits inputs; figures in docs/) and the batch-dependence probe; JSON in
#                  analysis/results/ (about 2 minutes)
#   make test-torch20  the suite on an IPU host's stack without PopTorch: torch 2.0.1
#                  (PopTorch's pin) + requirements-ipu.txt, in .venv-torch20
#   make docs      regenerate docs/options.md from the option table in train/config.py
#                  (python -m train.config --markdown docs/options.md); a test fails until
#                  it is regenerated
#
# IPU hosts: activate the Poplar SDK's PopTorch environment first (SDK 3.3 or later: an
# older one is refused before anything is installed). When the active Python already
# imports poptorch, requirements-ipu.txt goes into that environment and its torch is left
# alone; any other active environment (CI, laptops) still gets .venv.

SYSTEM_PYTHON ?= python3
HAS_POPTORCH := $(shell $(SYSTEM_PYTHON) -c "import poptorch" >/dev/null 2>&1 && echo yes)

ifeq ($(HAS_POPTORCH),yes)
PYTHON := $(SYSTEM_PYTHON)
REQUIREMENTS := requirements-ipu.txt
INSTALLED := .installed-ipu
DEV_INSTALLED := .installed-ipu-dev
else
PYTHON := .venv/bin/python
REQUIREMENTS := requirements.txt
INSTALLED := .venv/.installed
DEV_INSTALLED := .venv/.installed-dev
endif

POPLAR_SDK := $(or $(POPLAR_SDK_ENABLED),$(shell command -v popc 2>/dev/null))

# pip install -r FILE, run (and shown) only when FILE asks for something not installed: a
# fresh checkout's requirements files are newer than an existing .venv's stamps, and pip then
# printed a "Requirement already satisfied" line for every package. pip's dry run reports what
# it would install; a pip without one (before 22.2) always runs.
pip_install = $(PYTHON) -m pip install --dry-run --quiet --report - -r $(1) 2>/dev/null \
	| grep -q '"install": \[\]' || { echo "$(PYTHON) -m pip install -r $(1)"; \
	$(PYTHON) -m pip install -r $(1); }

.PHONY: install custom_ops train test bench-layer bench bench-sync bench-gpu plan accuracy analysis test-torch20 docs clean

install: $(INSTALLED) custom_ops

$(INSTALLED): $(REQUIREMENTS)
ifeq ($(HAS_POPTORCH),yes)
	$(PYTHON) proxynorm/ops/ipu/sdk.py  # Poplar SDK >= 3.3 (torch 2.0.1), else one line, exit 2
else
	@test -x $(PYTHON) || { echo "$(SYSTEM_PYTHON) -m venv .venv"; $(SYSTEM_PYTHON) -m venv .venv; }
endif
	@$(call pip_install,$(REQUIREMENTS))
	@touch $@

$(DEV_INSTALLED): requirements-dev.txt $(INSTALLED)
	@$(call pip_install,requirements-dev.txt)
	@touch $@

custom_ops: $(INSTALLED)
	$(PYTHON) -m proxynorm.ops.build
ifneq ($(POPLAR_SDK),)
	$(MAKE) -C proxynorm/ops/ipu
else
	@echo "custom_ops: IPU op skipped (no Poplar SDK: popc is not on PATH and POPLAR_SDK_ENABLED is unset)"
endif

train: install
	$(PYTHON) -m train --config digits_resnet_group_pn $(TRAIN_ARGS)

test: install $(DEV_INSTALLED)
	$(PYTHON) -m pytest $(PYTEST_ARGS)

bench-layer: install
	$(PYTHON) -m benchmarks.layer

bench: install
	$(PYTHON) -m benchmarks.model

bench-sync: install
	$(PYTHON) -m benchmarks.sync
	$(PYTHON) -m benchmarks.sync_cost

bench-gpu: install
	$(PYTHON) -m benchmarks.layer --device cuda
	$(PYTHON) -m benchmarks.layer --device cuda --channels-last
	$(PYTHON) -m benchmarks.layer --device cuda --dtype bfloat16
	$(PYTHON) -m benchmarks.layer --device cuda --dtype bfloat16 --channels-last
	$(PYTHON) -m benchmarks.model --device cuda
	$(PYTHON) -m benchmarks.model --device cuda --dtype bfloat16 --channels-last

plan: install
	$(PYTHON) -m benchmarks.plan

accuracy: install
	$(PYTHON) -m benchmarks.accuracy --data cluttered_digits --figures docs --headline

analysis: install
	$(PYTHON) -m analysis.power --inputs gaussian
	$(PYTHON) -m analysis.power --inputs digits
	$(PYTHON) -m analysis.batch_dependence

.venv-torch20/.installed: requirements-ipu.txt requirements-dev.txt
	test -x .venv-torch20/bin/python || $(SYSTEM_PYTHON) -m venv .venv-torch20
	.venv-torch20/bin/python -m pip install torch==2.0.1 -r requirements-ipu.txt -r requirements-dev.txt
	touch $@

test-torch20: .venv-torch20/.installed
	.venv-torch20/bin/python -m pytest $(PYTEST_ARGS)

docs: $(INSTALLED)
	$(PYTHON) -m train.config --markdown docs/options.md

clean:
	rm -rf proxynorm/ops/ipu/build

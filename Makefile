# kd-plugin: set-up, tests and demo. Every target sets itself up (idempotent).
PY      ?= python3.11
VENV    ?= .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.kd-setup-done
SETUP_DEPS := Makefile setup.py scripts/fairseq_compat.py kd_plugin/fairseq_patches/fixes.py

.PHONY: setup test test-fast demo demo-quick teacher plateau study study-quick bench gpu-bundle gpu-check clean
setup: $(STAMP)

$(STAMP): $(SETUP_DEPS)
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade "pip<25" "setuptools<76" wheel
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q "numpy<2.3" hydra-core==1.3.2 omegaconf==2.3.0 bitarray "sacrebleu==2.6.*" regex \
	    sentencepiece cython pytest "pytest-xdist==3.*" matplotlib tensorboardX ctranslate2==4.8.5
	$(VPY) -m pip show -q fairseq 2>/dev/null || $(VPY) -m pip install -q --no-deps fairseq==0.12.2
	$(VPY) scripts/fairseq_compat.py
	$(VPY) -m pip install -q --no-deps --no-build-isolation -e .
	cd / && $(abspath $(VPY)) -c "import kd_plugin.cli.gate_dump"  # the editable install really resolves
	touch $(STAMP)

# tests run TEST_JOBS at a time (default: the cores), one test file per worker process, one thread each;
# console scripts, also those of the driver tests' pipelines (KDEXP_WARM=1), run in forks of a warm process
# (examples/kdexp/warm.py)
TEST_JOBS ?= $(shell nproc 2>/dev/null || echo 1)
test: setup
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(VPY) -m pytest -q -n $(TEST_JOBS) --dist loadfile tests

demo: setup
	$(VPY) examples/demo.py $(DEMO_ARGS)

demo-quick: setup
	QUICK=1 $(VPY) examples/demo.py $(DEMO_ARGS)

# The plateau teacher (issue 28; resumable, hours on one core): work/plateau, then artifacts/plateau/teacher.pt
teacher: setup
	$(VPY) examples/plateau_teacher.py $(TEACHER_ARGS)

# The plateau study (issue 28; docs/PLATEAU.md): resumable, one record per finished run in docs/plateau_results.json
# (PLATEAU_ARGS=--commit commits each at once; --snapshot before a stop; --report regenerates the doc)
plateau: setup
	$(VPY) examples/plateau.py $(PLATEAU_ARGS)

# The KD study (docs/STUDY.md): the full grid (resumable) and its --quick smoke grid
study: setup
	$(VPY) examples/study.py --plot docs $(STUDY_ARGS)

study-quick: setup
	$(VPY) examples/study.py --quick $(STUDY_ARGS)

# the benchmark imports the examples' library (examples/kdexp: the demo's sizes, steps and configurations)
bench: setup
	PYTHONPATH=examples $(VPY) benchmarks/bench_kd.py $(BENCH_ARGS)

# GPU check (docs/GPU.md): gpu-bundle downloads, here, what the offline GPU machine lacks (GPU_PYVER=3.12);
# gpu-check runs there, in the repository root (the device tool's command: bash scripts/gpu_check.sh)
GPU_PYVER ?= 3.12
GPU_BUNDLE ?= .gpu-bundle
gpu-bundle: setup
	GPU_PYVER=$(GPU_PYVER) GPU_BUNDLE=$(GPU_BUNDLE) PY=$(VPY) scripts/gpu_bundle.sh

gpu-check:
	GPU_BUNDLE=$(GPU_BUNDLE) bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) *.egg-info

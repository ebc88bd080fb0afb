# The two commands of the README. Both build .venv once (exact pins from constraints.txt) and
# reuse it afterwards: the stamp file is only remade when the dependency list changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CORES ?= 2

.PHONY: run test test-slurm lint install clean-outputs slurm-packages dicomizer

# Bytecode: uv does not compile at install, and where PYTHONDONTWRITEBYTECODE is set (as on our
# build machines) every job would then recompile torch and pandas on import, seconds of CPU per
# job. Jobs write their bytecode once, under .venv (never into the source tree), and reuse it.
RUN_ENV := env -u PYTHONDONTWRITEBYTECODE PYTHONPYCACHEPREFIX=$(abspath $(VENV))/pycache

# Where the run writes everything: config.yaml's `outdir`, or the schema's default when it has none.
# Read when a recipe runs (after .venv exists), so that editing config.yaml needs no other change.
OUTDIR = $(shell $(BIN)/python -c 'import yaml; \
	c = yaml.safe_load(open("config.yaml")) or {}; \
	s = yaml.safe_load(open("workflow/schemas/config.schema.yaml")); \
	print(c.get("outdir", s["properties"]["outdir"]["default"]))')

# The HTML report is only rebuilt when a result or QC picture is newer than it, so a second
# `make run` with nothing to do runs no job and writes nothing.
run: $(STAMP)
	$(RUN_ENV) $(BIN)/snakemake --cores $(CORES)
	@out='$(OUTDIR)'; [ -n "$$out" ] || { echo "no outdir read from config.yaml" >&2; exit 1; }; \
	report="$$out/report.html"; \
	if [ ! -f "$$report" ] || [ -n "$$(find "$$out/results" "$$out/qc" -newer "$$report" -print -quit 2>/dev/null)" ]; then \
		echo "$(BIN)/snakemake --report $$report"; $(RUN_ENV) $(BIN)/snakemake --report "$$report"; fi

# Two pytest workers, each taking whole test files (a module's fixtures, such as the tiny workflow
# run that test_workflow.py shares, are built once): the workflow tests wait on Snakemake jobs and
# their start-up much of the time, and the other files fill those gaps.
test: $(STAMP) dicomizer
	$(RUN_ENV) $(BIN)/pytest -q -n $(CORES) --dist loadfile

# The slide-format tests convert the real CMU-1 slide to DICOM with wsidicomizer, which needs the
# system TurboJPEG library (Debian libturbojpeg0, installed here when missing and we are root with
# apt-get) and a wsidicom older than tiatoolbox's: so an environment of its own, .venv/dicomizer,
# with the exact pins of tests/tools/dicomizer-requirements.txt. Without either, those tests skip.
DICOMIZER := $(VENV)/dicomizer
dicomizer: $(DICOMIZER)/.installed
$(DICOMIZER)/.installed: tests/tools/dicomizer-requirements.txt | $(STAMP)
	@if ! ldconfig -p 2>/dev/null | grep -q libturbojpeg; then \
		if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
			echo "note: no libturbojpeg and not root with apt-get: the DICOM tests will skip" >&2; exit 0; fi; \
		echo "apt-get install libturbojpeg0"; export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -qq && apt-get install -y -qq libturbojpeg0 >/dev/null; fi
	test -x $(DICOMIZER)/bin/python || $(PYTHON) -m venv $(DICOMIZER)
	$(BIN)/uv pip install --quiet --python $(DICOMIZER)/bin/python -r tests/tools/dicomizer-requirements.txt
	touch $@

# The workflow on a real (one-node, throw-away) SLURM cluster: about 15 minutes on 2 cores, so a
# target of its own, which CI runs after `make test`.
test-slurm: $(STAMP) slurm-packages
	$(RUN_ENV) $(BIN)/pytest -q -m slurm tests/test_slurm_cluster.py

# `make test-slurm` starts a throw-away SLURM cluster on this machine: it needs the Debian
# packages slurm-wlm and munge. Installed here when a program is missing and we are root with apt-get
# (a fresh CI machine); otherwise a note, and those tests skip.
SLURM_PROGRAMS := munged slurmctld slurmd sbatch srun squeue scontrol scancel sinfo
slurm-packages:
	@missing=""; for p in $(SLURM_PROGRAMS); do \
		PATH="$$PATH:/usr/sbin:/sbin" command -v $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
		echo "note: missing$$missing; not root or no apt-get, so the SLURM cluster tests will skip" >&2; \
		exit 0; fi; \
	echo "apt-get install slurm-wlm munge (missing:$$missing)"; \
	export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && apt-get install -y -qq slurm-wlm munge

lint: $(STAMP)
	$(BIN)/ruff check preprocessing healnet tests benchmarks
	$(BIN)/snakemake --lint

install: $(STAMP)

# uv resolves the same pins as pip but downloads in parallel: about 1 min instead of 4-5 for a
# fresh .venv (torch and its CUDA libraries are most of the 6.6 GB).
UV_VERSION := 0.13.9
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	$(BIN)/uv pip install --quiet --python $(BIN)/python -c constraints.txt -e '.[dev,slurm]'
	touch $(STAMP)

# Deletes the output folder (refusing one that holds this repository) and Snakemake's records.
clean-outputs: $(STAMP)
	@out="$$(realpath -m '$(OUTDIR)')"; \
	case "$(CURDIR)/" in "$$out"/*) echo "outdir $$out holds the repository: not deleting it" >&2; exit 1;; esac; \
	echo "rm -rf $$out .snakemake"; rm -rf "$$out" .snakemake

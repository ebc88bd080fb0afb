# The two commands of the README. Both build .venv once (exact pins from constraints.txt) and
# reuse it afterwards: the stamp file is only remade when the dependency list changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CORES ?= 2

.PHONY: run test lint install clean-outputs

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

test: $(STAMP)
	$(RUN_ENV) $(BIN)/pytest -q

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

# The two commands of the README. Both build .venv once (exact pins from constraints.txt) and
# reuse it afterwards: the stamp file is only remade when the dependency list changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CORES ?= 2

.PHONY: run test lint install clean-outputs

run: $(STAMP)
	$(BIN)/snakemake --cores $(CORES)

test: $(STAMP)
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check preprocessing healnet tests benchmarks
	$(BIN)/snakemake --lint

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev,slurm]'
	touch $(STAMP)

clean-outputs:
	rm -rf data tiles qc features omics models results logs report.html .snakemake

"""Slide and table preprocessing: from raw TCGA inputs to tiles, feature stores and omic matrices.

Modules: ``slides`` (open, MPP chain, physical reads), ``tissue`` (mask), ``tiling`` (grid, QC),
``encoders`` (registry, weights), ``extract`` (loader, Zarr writer), ``omics`` (tables, barcodes,
splits, fold-fitted transforms), ``svs_writer`` and ``demo`` (synthetic TCGA-like cohort).
"""

import os

# OpenMP threads that sleep instead of spinning while they wait for each other. Every healnet command
# imports this package before torch loads libgomp, so it applies to extraction and training alike:
# with a reader process and other jobs sharing the cores, spinning threads waiting at every layer for
# a descheduled sibling made 2-thread inference 2-3x slower than 1 thread on a 2-core machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

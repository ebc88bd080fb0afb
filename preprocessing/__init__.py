"""Slide and table preprocessing: from raw TCGA inputs to tiles, feature stores and omic matrices.

Modules: ``slides`` (open, MPP chain, physical reads), ``tissue`` (mask), ``tiling`` (grid, QC),
``encoders`` (registry, weights), ``extract`` (loader, Zarr writer), ``omics`` (tables, barcodes,
splits, fold-fitted transforms), ``svs_writer`` and ``demo`` (synthetic TCGA-like cohort).
"""

"""From raw inputs to the model's inputs: slides to tiles and feature stores, omic tables to per-patient
matrices and folds.

Stages, in data-flow order: ``slides`` (find and open slides, the MPP chain), ``tissue`` (mask),
``tiling`` (patch grid, QC picture, the tiles file), ``features`` (encoders, extraction, the feature
store), ``omics`` (tables, barcodes, joins, splits, the omics directory). ``demo`` writes synthetic
TCGA-like cohorts; ``core`` is what every stage and ``healnet`` share (errors, atomic writes,
reader processes, devices).
"""

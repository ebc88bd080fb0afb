"""HEALNet survival modelling: model, baselines, loss, data, cross-validated training, evaluation, report."""

"""One candidate of ``training.search`` scored on one outer fold's inner folds: ``healnet search``.

The candidate (``--setting``, numbered in the order :func:`healnet.training.search.candidates`
lists them) is trained on all inner folds of the fold's training patients but one and scored on
that one, for each inner fold; the held-out patients of the outer fold are never read. The scores
go to ``-o`` (``search/fold{k}/setting{i}.json``), which ``healnet train --search-dir`` reads to
choose the fold's settings. The workflow runs one such job per fold and candidate.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from healnet.modalities import LINEAR_MODELS
from healnet.training.cache import decoded_feature_cache
from healnet.training.cli import run_parser, run_settings
from healnet.training.cv import checked_folds, feature_cache_root, prepare_run
from healnet.training.search import score_setting, write_scores
from preprocessing.core.errors import InputError


def _parser() -> argparse.ArgumentParser:
    parser = run_parser("healnet search", __doc__.split("\n\n")[0])
    parser.add_argument("--fold", required=True, type=int,
                        help="the outer fold whose training patients are split")
    parser.add_argument("--setting", required=True, type=int, help="the candidate's number, from 0")
    parser.add_argument("-o", "--output", required=True, type=Path, help="the scores file (.json)")
    return parser


def cli(argv: list[str] | None = None) -> int:
    """``healnet search``: one candidate's inner c-indices on one fold."""
    args = _parser().parse_args(argv)
    settings, device = run_settings(args)
    if args.model in LINEAR_MODELS:  # checked first: a closed-form model's settings carry no search
        raise InputError("--model", f"{args.model} is fitted in closed form: training.search does not apply")
    if not settings.training.search:
        raise InputError(args.config, "training.search is not set: there is nothing to search")
    settings, cohort = prepare_run(settings, args.model, args.omics_dir, args.features_dir, device,
                                   args.threads)
    [fold] = checked_folds(cohort, [args.fold], "--fold")
    with decoded_feature_cache(feature_cache_root(settings, cohort)) as cache_dir:
        scores = score_setting(cohort, args.model, fold, settings, args.setting, device, args.models_dir,
                               settings.run.workers, cache_dir)
    write_scores(args.output, scores)
    print(f"{args.cohort} {args.model} fold {fold} setting {args.setting} {scores['setting']}: "
          f"mean inner c-index {scores['mean']:.4f}")
    return 0

"""The ``healnet`` command: one subcommand per pipeline step, each a thin call of a module's ``cli``.

Every Snakemake rule runs one of these, so a cluster job, a rerun by hand and a test all go through
the same code. A bad input ends the command with one line on stderr naming the file and the reason
and exit status 1.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Sequence

from preprocessing.core.errors import InputError

# subcommand -> (module defining ``cli(argv) -> int``, one-line summary)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("preprocessing.demo.cohort", "write a synthetic TCGA-like demo cohort (slides and omic tables)"),
    "tile": ("preprocessing.tiling.tile", "tissue mask, MPP-aware patch grid and QC picture of a slide"),
    "encoders": ("preprocessing.features.registry",
                 "list the patch encoders: width, input size, µm/px, normalisation, weights, licence"),
    "encoder": ("preprocessing.features.encoder_file",
                "build an encoder once, frozen, for the extraction jobs"),
    "extract": ("preprocessing.features.extract", "patch embeddings of one slide into a Zarr store"),
    "import-features": ("preprocessing.features.import_features",
                        "CLAM or TRIDENT patch-feature .h5 files into our feature stores, with provenance"),
    "omics": ("preprocessing.omics.cli", "join clinical and omic tables per patient; folds and manifest"),
    "search": ("healnet.training.search_cli",
               "one candidate of training.search scored on one fold's inner folds (nested selection)"),
    "train": ("healnet.training.cli", "cross-validated training of one model on one cohort"),
    "collect": ("healnet.training.collect", "join per-fold training outputs into one model's results"),
    "evaluate": ("healnet.evaluation.summary", "per-cohort summary table of every trained model"),
    "report": ("healnet.report.cli", "figures for one cohort: survival curves, c-index, QC, attention"),
}


def _usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: healnet <command> [options]   (healnet <command> --help for its options)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def stop_cleanly_on_sigterm() -> None:
    """Make SIGTERM (how a cluster ends a job at its time limit, and how Snakemake cancels one) end
    the command like an exception: ``finally`` blocks and context managers then run, so temporary
    outputs and a training job's decoded-feature cache are removed. Python's default would end the
    process without running them. Set from the main thread only; reader processes forked later
    inherit it, so a SIGTERM there ends that reader the same way."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def stop(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends it at once
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch ``healnet <command> ...``; returns the process exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0
    name, rest = args[0], args[1:]
    if name not in SUBCOMMANDS:
        print(f"healnet: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    # OpenMP threads that sleep instead of spinning while they wait for each other, set before torch
    # loads libgomp: with reader processes and other jobs sharing the cores, spinning threads waiting
    # for a descheduled sibling at every layer made 2-thread inference slower than 1 thread.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s healnet {name} %(levelname)s: %(message)s")
    stop_cleanly_on_sigterm()
    module = importlib.import_module(SUBCOMMANDS[name][0])
    try:
        return int(module.cli(rest) or 0)
    except InputError as err:
        print(f"healnet {name}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

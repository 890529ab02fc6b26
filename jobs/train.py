"""Fine-tune a classifier with Ray Train following a named recipe.

    python jobs/train.py --recipe s000_mobilenet_v2_all4 --data ../shared/data/all-taleqani/Original
    python jobs/train.py --recipe cell_blast --data ../shared/data/all-idb ../shared/data/bccd \
        ../shared/data/all-taleqani/Original          # a cell model on three laboratories
    ray job submit --working-dir . -- python jobs/train.py --recipe ... --data ... --workers 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if not __package__:  # run as a file (python jobs/x.py, ray job submit): see jobs/__init__.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from allcore import errors  # noqa: E402
from allcore.models.recipes import list_recipes, load_recipe  # noqa: E402
from allcore.imaging.files import absolute_location  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, help=f"one of {', '.join(list_recipes())} or a .toml path")
    parser.add_argument("--data", type=absolute_location, required=True, nargs="+", metavar="ROOT",
                        help="folder-per-class tree or manifest (local or s3://); an ALL-IDB or "
                        "BCCD root trains on its cell crops; several roots, each an ALL-IDB, BCCD "
                        "or Taleqani root, train a cell model on all their cell crops")
    parser.add_argument("--manifest", type=absolute_location, help="CSV/Parquet with path,label[,group] (paths relative to it)")
    parser.add_argument("--split-manifest", type=absolute_location, help="reuse this split instead of computing one")
    parser.add_argument("--output", type=absolute_location, default="runs", help="local folder or s3:// prefix (default: runs)")
    parser.add_argument("--name", help="run name; the same name resumes an interrupted run "
                        "(default: the recipe name)")
    parser.add_argument("--workers", type=int, default=1,
                        help="Ray Train workers (default 1); they train the model one worker would: "
                        "each takes batch-size/N images of every batch, the learning rate stays "
                        "the recipe's, BatchNorm is synchronised")
    parser.add_argument("--min-workers", type=int, help="elastic: when a node is lost, go on "
                        "from the last checkpoint with as few as this many workers (and grow back "
                        "to --workers when nodes return); the model is the same, the batch being "
                        "global. Default: --workers, a fixed group, whose restart needs a "
                        "replacement node")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker")
    parser.add_argument("--max-failures", type=int, default=2, help="worker failures to recover from")
    parser.add_argument("--epochs", type=int, help="override the recipe's epochs")
    parser.add_argument("--input-size", type=int, help="override the recipe's input size")
    parser.add_argument("--batch-size", type=int, help="override the recipe's batch size: the "
                        "global batch of one optimizer step, all workers together (a multiple of "
                        "--workers)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="Ray's and MLflow's own log lines too (default: "
                        "allcore's progress lines only; "
                        "Ray's go to its session log files)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override any recipe field, e.g. --set lr=3e-4 --set augment.hflip=0.5")
    return parser.parse_args(argv)


@errors.job_main  # a known fault (no Ray cluster, no weights): one line and its status
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = list(args.set)
    for field in ("epochs", "input_size", "batch_size"):
        if getattr(args, field) is not None:
            overrides.append(f"{field}={getattr(args, field)}")
    recipe = load_recipe(args.recipe).override(overrides)

    from pipelines import init_ray
    from pipelines.train import TrainJob, run_training

    try:  # the job is checked before Ray starts
        job = TrainJob(recipe=recipe, data=args.data[0], more_data=tuple(args.data[1:]),
                       output=args.output, name=args.name or recipe.name,
                       manifest=args.manifest, split_manifest=args.split_manifest,
                       workers=args.workers, min_workers=args.min_workers, use_gpu=args.gpu,
                       max_failures=args.max_failures, verbose=args.verbose)
        init_ray(verbose=args.verbose)
    except ValueError as error:
        sys.exit(f"jobs/train.py: error: {error}")
    for uri in run_training(job):
        print(uri)
    return errors.OK


if __name__ == "__main__":
    sys.exit(main())

"""Score an image archive (camera fields and whole-slide scans) with a trained model artifact
into a Parquet table (Ray Data).

    python jobs/score.py --model runs/s000/model --input /data/smears --output /data/predictions
    ray job submit --working-dir . -- python jobs/score.py --model s3://models/s000 \\
        --input s3://lab/smears --output s3://lab/predictions --actors 1,8

Incremental: inputs already committed for this model are skipped; --full rescores them (new rows
under a new run_id; the `latest_predictions` view in sql/bi_queries.sql keeps the newest).
Exit status: see the README's exit-code table (0 ok; 2 error rate above --max-error-rate and 3
share of fields flagged for review above --max-review-rate, the archive having drifted from the
model's training data (_runs/<run_id>/drift.png), both with everything scored still committed;
4-8 a fault that ends the run with one line saying what to do: allcore.errors).
s3:// credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
AWS_ENDPOINT_URL.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if not __package__:  # run as a file (python jobs/x.py, ray job submit): see jobs/__init__.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from allcore import errors  # noqa: E402
from allcore.imaging.files import absolute_location  # noqa: E402
from allcore.scoring.config import ScoringConfig  # noqa: E402


def _actors(text: str) -> tuple[int, int]:
    try:
        low, _, high = text.partition(",")
        return int(low), int(high or low)
    except ValueError:
        message = f"--actors takes MIN,MAX (e.g. 1,4), got {text!r}"
        raise argparse.ArgumentTypeError(message) from None


def parse_args(argv: list[str] | None = None) -> ScoringConfig:
    defaults = ScoringConfig(model="", input="", output="")
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=absolute_location,
                        help="model artifact folder or s3:// prefix")
    parser.add_argument("--input", required=True, type=absolute_location,
                        help="image folder or s3:// prefix (recursive)")
    parser.add_argument("--manifest", type=absolute_location, help="text file, one image path per line "
                        "(relative to --input), scored instead of listing --input")
    parser.add_argument("--output", required=True, type=absolute_location,
                        help="table root, local folder or s3:// prefix")
    parser.add_argument("--full", action="store_true", help="rescore inputs already committed")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--actors", type=_actors, default=defaults.actors, metavar="MIN,MAX",
                        help="inference actor pool size (default %(default)s)")
    parser.add_argument("--max-error-rate", type=float, default=defaults.max_error_rate,
                        help="exit 2 above this fraction of error rows (default %(default)s)")
    parser.add_argument("--max-review-rate", type=float, default=defaults.max_review_rate,
                        help="warn and exit 3 above this fraction of ok fields flagged for review "
                        "(needs_review) (default %(default)s)")
    parser.add_argument("--specimen-pattern", help="regex on the input path; capture group 1 is "
                        "the specimen id (default: the parent folder name)")
    parser.add_argument("--commit-every", type=int, default=defaults.commit_every,
                        help="result rows per commit, cell rows included (default %(default)s)")
    path = parser.add_mutually_exclusive_group()
    path.add_argument("--exact", action="store_true", help="score with the eager fp32 model, the "
                      "path it was evaluated with (default: the fastest path verified for the "
                      "model, ONNX Runtime on CPU where docs/PERFORMANCE.md lists it as verified; "
                      "the run summary says which path each model used and why)")
    path.add_argument("--fast", action="store_true", help="the fast path even where it is not "
                      "verified for the model: ONNX Runtime on CPU (pip install 'allcore[fast]'), "
                      "bf16 autocast on GPU")
    parser.add_argument("--gpu", action="store_true", help="one GPU per inference actor; "
                        "without it GPUs are used when the cluster has some at start")
    parser.add_argument("--per-cell", action="store_true", help="also one row per detected white "
                        "cell (classified by --cell-model) and a specimen_summary table; see "
                        "docs/SCORING.md")
    parser.add_argument("--max-pixels", type=int, default=defaults.max_pixels,
                        help="largest image decoded, in pixels (decompression-bomb guard; larger "
                        "images become 'too large' error rows; default %(default)s)")
    parser.add_argument("--cell-model", type=absolute_location, help="cell model artifact (e.g. recipe "
                        "cell_blast) that classifies the cell rows; without it --per-cell "
                        "classifies crops with --model, which is unvalidated")
    parser.add_argument("--cell-diameter", type=float, metavar="PX", help="white-cell diameter "
                        "in input pixels for the whole run (default: the median estimate over a "
                        "sample of the inputs)")
    parser.add_argument("--mpp", type=float, metavar="UM_PER_PX", help="micrometres per pixel "
                        "of inputs whose files do not say: whole slides without pixel-size "
                        "metadata (else their error row says so), and camera fields (then the "
                        "white-cell diameter follows from it instead of an estimate)")
    parser.add_argument("-v", "--verbose", action="store_true", help="Ray's INFO logs and progress "
                        "bars (default: one progress line per commit: images done / total, "
                        "rate, time left)")
    args = parser.parse_args(argv)
    try:
        return ScoringConfig(model=args.model, input=args.input, output=args.output,
                             input_list=args.manifest, full=args.full, batch_size=args.batch_size,
                             actors=args.actors, max_error_rate=args.max_error_rate,
                             max_review_rate=args.max_review_rate,
                             specimen_pattern=args.specimen_pattern,
                             commit_every=args.commit_every, max_pixels=args.max_pixels,
                             inference="exact" if args.exact else "fast" if args.fast else "auto",
                             gpu=args.gpu, per_cell=args.per_cell,
                             cell_model=args.cell_model, cell_diameter_px=args.cell_diameter,
                             mpp=args.mpp, verbose=args.verbose)
    except ValueError as exc:
        parser.error(str(exc))


@errors.job_main  # a fault that ends the run early: one line and its status (allcore.errors)
def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from pipelines.score import run_scoring  # imports Ray: keep --help fast

    summary = run_scoring(config)
    print(summary.line())
    if summary.failed:
        print(f"FAILED: error rate {summary.error_rate:.2%} exceeds --max-error-rate "
              f"{config.max_error_rate:.2%} (or the accounting does not balance); the error rows "
              f"say why: see the error summary in sql/bi_queries.sql", file=sys.stderr)
        return errors.ERROR_RATE
    if summary.review_rate_exceeded:
        print(f"WARNING: {summary.review_rate:.2%} of the fields scored need review, more than "
              f"--max-review-rate {config.max_review_rate:.2%}: these images differ from what the "
              f"model was trained on (scanner, stain, magnification, focus?). Do not act on this "
              f"run's calls before looking at {config.output}/_runs/{summary.run_id}/drift.png "
              f"and the review_reason column", file=sys.stderr)
        return errors.REVIEW_RATE
    return errors.OK


if __name__ == "__main__":
    sys.exit(main())

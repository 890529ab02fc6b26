"""The embedded default, end to end on one machine with in-process Ray:

1. generate a small labelled sample archive of synthetic smear fields (no real data needed), and
   one small whole-slide scan (a pyramidal TIFF) beside the class folders;
2. fine-tune the ``demo`` recipe (MobileNetV2, ImageNet weights when installed) with Ray Train;
3. score the archive, fields and slide, with Ray Data into a Parquet table;
and print where the model artifact, the report and the predictions are.

    python jobs/demo.py [--workdir demo_run]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if not __package__:  # run as a file (python jobs/x.py, ray job submit): see jobs/__init__.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from allcore import errors  # noqa: E402
from allcore.errors import WeightsUnavailableError  # noqa: E402
from allcore.imaging.files import absolute_location  # noqa: E402
from allcore.data.labels import get_label_set  # noqa: E402
from allcore.models.recipes import load_recipe  # noqa: E402
from allcore.data.synthetic import write_archive, write_slide  # noqa: E402


@errors.job_main  # a known fault (no Ray cluster): one line and its status
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=absolute_location, default="demo_run", help="where everything is written")
    parser.add_argument("--per-class", type=int, default=40, help="sample images per class")
    parser.add_argument("--epochs", type=int, help="override the demo recipe's epochs")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="Ray's and MLflow's own log lines too (default: "
                        "the demo's and allcore's progress lines only)")
    args = parser.parse_args(argv)

    from allcore.evaluation.evaluate import evaluate_artifact, select_samples
    from allcore.scoring.config import ScoringConfig
    from pipelines import init_ray
    from pipelines.score import run_scoring
    from pipelines.train import TrainJob, run_training

    workdir = Path(args.workdir).resolve()
    recipe = load_recipe("demo")
    if args.epochs:
        recipe = recipe.override([f"epochs={args.epochs}"])
    archive = workdir / "sample_archive"
    samples = write_archive(archive, label_set=get_label_set(recipe.label_set),
                            per_class=args.per_class, seed=0)
    write_slide(archive / "demo-slide.tif", columns=4, rows=3)  # outside the class folders: not trained on
    print(f"[demo] generated {len(samples)} sample images and one slide (demo-slide.tif) in {archive}")

    def train(recipe, name: str) -> str:
        [uri] = run_training(TrainJob(recipe=recipe, data=str(archive), output=str(workdir / "runs"),
                                      name=name, verbose=args.verbose))
        return uri

    init_ray(verbose=args.verbose)
    try:
        artifact = train(recipe, "demo")
    except WeightsUnavailableError as exc:  # raised on the driver, before Ray Train starts
        print(f"[demo] {exc}\n[demo] retrying from random initialisation (accuracy will be lower)")
        artifact = train(recipe.override(["pretrained=false"]), "demo-random-init")

    evaluation = workdir / "evaluation"
    test_samples = select_samples(None, recipe.label_set, split="test",
                                  split_manifest=str(Path(artifact).parent / "split_manifest.csv"))
    summary = evaluate_artifact(artifact, test_samples, evaluation, n_boot=200)
    summary_run = run_scoring(ScoringConfig(model=artifact, input=str(archive),
                                            output=str(workdir / "predictions"),
                                            verbose=args.verbose))
    print("\n[demo] done.")
    print(f"  model artifact : {artifact}")
    print(f"  report         : {evaluation / 'report.html'} "
          f"(held-out test accuracy {summary['accuracy']:.3f}, n={summary['n']})")
    print(f"  predictions    : {workdir / 'predictions'} "
          f"({summary_run.ok} ok, {summary_run.errors} errors, {summary_run.skipped} skipped)")
    print(f"  slide overview : {next((workdir / 'predictions' / 'slides').glob('demo-slide-*.png'), 'not written')} "
          "(and its QuPath GeoJSON beside it)")
    table = f"{workdir / 'predictions'}/predictions/**/*.parquet"
    print(f"  query          : .venv/bin/python -c \"import duckdb; duckdb.sql(\\\"SELECT pred_label, "
          f"count(*) FROM read_parquet('{table}', hive_partitioning=true) GROUP BY 1\\\").show()\"")
    return errors.OK


if __name__ == "__main__":
    sys.exit(main())

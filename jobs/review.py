"""The review app and its exports.

    python jobs/review.py serve --output /data/predictions --model runs/s000/model [--cell-model runs/cell/model]
    python jobs/review.py export-manifest --output /data/predictions --out runs/reviewed
    python jobs/train.py --recipe cell_blast --data runs/reviewed/cells.csv ...
    python jobs/review.py export-geojson --output /data/predictions --out geojson/

`serve` starts Ray Serve on this machine (loopback, port 8000) and blocks; open the printed
address. Bound to another host it refuses to start without --token (or ALLCORE_REVIEW_TOKEN).
On a cluster use `serve deploy infra/serve_review.yaml` instead.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
import time
from pathlib import Path

if not __package__:  # run as a file (python jobs/x.py, ray job submit): see jobs/__init__.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from allcore import errors  # noqa: E402
from allcore.models.artifact import verified_card  # noqa: E402
from allcore.data.celldata import CellCropGeometry  # noqa: E402
from allcore.imaging.files import absolute_location  # noqa: E402
from allcore.review.corrections import CorrectionStore, export_manifest, scored_crop_diameters  # noqa: E402
from allcore.review.geojson import feature_collections, write_feature_collections  # noqa: E402
from allcore.review.queue import ReviewQueue  # noqa: E402


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve_app(args: argparse.Namespace) -> int:
    from pipelines.review import TOKEN_ENV, review_token

    token = review_token(args.token)
    if not is_loopback(args.host) and not token:
        print(f"--host {args.host} is reachable from other machines: give --token SECRET (or set "
              f"{TOKEN_ENV}), or keep the default 127.0.0.1", file=sys.stderr)
        return 2
    for artifact in filter(None, (args.model, args.cell_model)):
        verified_card(artifact)  # a tampered artifact fails here, not in the Serve replica
    from ray import serve

    from pipelines.review import ReviewApp

    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(ReviewApp.bind(args.output, args.model, args.cell_model, token), blocking=False)
    print(f"review app on http://{args.host}:{args.port}/" + (f"?token={token}" if token else ""))
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0


def export_training_manifest(args: argparse.Namespace) -> int:
    corrections = CorrectionStore(args.output).newest()
    if corrections.empty:
        print(f"no corrections under {args.output}; review some rows first", file=sys.stderr)
        return 1
    geometry = CellCropGeometry(side_cell_diameters=args.side_cell_diameters, input_size=args.input_size)
    for kind, uri in export_manifest(corrections, args.out, geometry=geometry,
                                     crop_diameters=scored_crop_diameters(args.output)).items():
        print(f"{kind} manifest: {uri}")
    return 0


def export_geojson(args: argparse.Namespace) -> int:
    rows = ReviewQueue(args.output).rows()
    if args.specimen:
        rows = rows[rows["specimen_id"] == args.specimen]
    written = write_feature_collections(
        feature_collections(rows, CorrectionStore(args.output).newest()), args.out)
    print(f"{len(written)} GeoJSON file(s) under {args.out}")
    return 0


@errors.job_main  # a tampered artifact, a path not found: one line and its status
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the review app (Ray Serve)")
    serve.add_argument("--output", type=absolute_location, required=True, help="scoring output root")
    serve.add_argument("--model", type=absolute_location, required=True, help="field model artifact")
    serve.add_argument("--cell-model", type=absolute_location, help="cell model artifact")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--token", help="required unless --host is loopback")
    serve.set_defaults(run=serve_app)
    manifest = commands.add_parser("export-manifest", help="corrections -> cells.csv/fields.csv for jobs/train.py --data")
    manifest.add_argument("--output", type=absolute_location, required=True, help="scoring output root")
    manifest.add_argument("--out", type=absolute_location, required=True, help="folder for crops and manifests")
    defaults = CellCropGeometry()
    manifest.add_argument("--side-cell-diameters", type=float, default=defaults.side_cell_diameters,
                          help="crop side in cell diameters (the cell model's geometry)")
    manifest.add_argument("--input-size", type=int, default=defaults.input_size, help="crop side in pixels")
    manifest.set_defaults(run=export_training_manifest)
    geojson = commands.add_parser("export-geojson", help="rows + corrections -> one GeoJSON per image")
    geojson.add_argument("--output", type=absolute_location, required=True, help="scoring output root")
    geojson.add_argument("--out", type=absolute_location, required=True, help="folder for the .geojson files")
    geojson.add_argument("--specimen", help="only this specimen's images")
    geojson.set_defaults(run=export_geojson)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())

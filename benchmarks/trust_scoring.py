"""The review decision as the nightly job writes it: ``jobs/score.py`` on each source, then the
flagged fraction per source read back from the Parquet with DuckDB (numbers of docs/TRUST.md).

    PYTHONPATH=$PWD nice .venv/bin/python -m benchmarks.trust_scoring \
        --model /tmp/trust_runs/s000m/model --split-manifest /tmp/trust_runs/s000m/split_manifest.csv \
        --data-root ../shared/data --output /tmp/trust_scoring

Sources: the Taleqani test split of the model's own split manifest (in distribution), ALL-IDB1
fields, ALL-IDB2 crops and BCCD images (other laboratories). One scoring run per source into its
own output root, so each has its own drift summary (``_runs/<run_id>/drift.json``) and exit status.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import duckdb


from allcore.imaging.files import iter_image_files
from allcore.data.splits import SplitManifest

REPO = Path(__file__).resolve().parents[1]


def sources(split_manifest: str, data_root: Path) -> dict[str, list[str]]:
    return {
        "taleqani-test": [s.path for s in SplitManifest.read(split_manifest).subset("test")],
        "all-idb1-fields": [f.uri for f in iter_image_files(str(data_root / "all-idb/ALL_IDB1/im"))],
        "all-idb2-crops": [f.uri for f in iter_image_files(str(data_root / "all-idb/ALL_IDB2/img"))],
        "bccd": [f.uri for f in iter_image_files(str(data_root / "bccd/JPEGImages"))],
    }


def flagged(output: Path) -> dict:
    """Flag rate, reasons and (where the path names the true class) accuracy of the field rows."""
    con = duckdb.connect()
    con.execute(f"CREATE VIEW rows AS SELECT * FROM read_parquet('{output}/predictions/**/*.parquet')"
                " WHERE row_kind = 'field' AND status = 'ok'")
    n, flagged_rows, abstain, blast = con.execute(
        "SELECT count(*), count(*) FILTER (needs_review), count(*) FILTER (call = 'abstain'), "
        "count(*) FILTER (call = 'blast') FROM rows").fetchone()
    reasons = dict(con.execute(
        "SELECT reason, count(*) FROM (SELECT unnest(string_split(review_reason, '; ')) AS reason "
        "FROM rows WHERE needs_review) GROUP BY 1 ORDER BY 2 DESC").fetchall())
    # Taleqani paths end in <class>/WBC-<class>-NNN.jpg: accuracy overall and on unflagged rows
    correct = ("pred_label = regexp_extract(source_uri, '/([^/]+)/WBC-[^/]+$', 1)")
    accuracy = con.execute(
        f"SELECT avg(({correct})::DOUBLE), avg(({correct})::DOUBLE) FILTER (NOT needs_review) "
        "FROM rows WHERE source_uri LIKE '%/WBC-%'").fetchone()
    return {"fields": n, "flagged": flagged_rows, "flagged_fraction": flagged_rows / n if n else None,
            "abstain": abstain, "called_blast": blast, "reasons": reasons,
            "accuracy_all": accuracy[0], "accuracy_unflagged": accuracy[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--split-manifest", required=True)
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, paths in sources(args.split_manifest, args.data_root.resolve()).items():
        listing = args.output / f"{name}.txt"
        listing.write_text("\n".join(paths) + "\n")
        out = args.output / name
        status = subprocess.run([sys.executable, str(REPO / "jobs/score.py"), "--model", args.model,
                                 "--input", str(args.data_root), "--manifest", str(listing),
                                 "--output", str(out), "--full", "--actors", "1,1"]).returncode
        results[name] = {"inputs": len(paths), "exit_status": status, **flagged(out)}
        print(name, json.dumps(results[name]), flush=True)
    (args.output / "trust_scoring.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

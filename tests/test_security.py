"""No credentials leak: a scoring job run with known (fake) S3 credentials must not write them to
its stdout/stderr, Ray's session logs, the Parquet files (data or key-value metadata), or any
summary, manifest or config it writes under the output root."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from allcore.data.labels import get_label_set
from allcore.data.synthetic import write_archive

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def leaks(blobs: dict[str, bytes], secrets: list[str]) -> list[str]:
    """'where: which secret' for every blob that contains one of the secrets."""
    return [f"{where}: {secret[:6]}..." for where, data in blobs.items() for secret in secrets
            if secret.encode() in data]


def test_leak_search_finds_a_planted_secret():
    """The search below can fail."""
    assert leaks({"summary.json": b'{"endpoint": "x", "key": "s3cr3t-value"}'},
                 ["s3cr3t-value"]) == ["summary.json: s3cr3t..."]


def test_scoring_job_writes_no_credentials(tmp_path, tiny_artifact, s3_server):
    import s3fs

    secrets = [s3_server["AWS_ACCESS_KEY_ID"], s3_server["AWS_SECRET_ACCESS_KEY"]]
    write_archive(tmp_path / "in", label_set=get_label_set("all4"), per_class=2, size=48)
    fs = s3fs.S3FileSystem(key=secrets[0], secret=secrets[1],
                           client_kwargs={"endpoint_url": s3_server["AWS_ENDPOINT_URL"]})
    fs.put(str(tmp_path / "in"), "lab/smears", recursive=True, batch_size=1)  # serving_s3
    fs.put(tiny_artifact, "lab/models/tiny", recursive=True, batch_size=1)
    # a short path: Ray's socket paths under it must stay below the 107-byte limit
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    env = {**os.environ, **s3_server, "PYTHONPATH": str(REPO), "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "score.py"), "--model", "s3://lab/models/tiny",
         "--input", "s3://lab/smears", "--output", "s3://lab/out", "--actors", "1,1",
         "--batch-size", "4", "--verbose"],
        env=env, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:].decode(errors="replace")

    blobs = {"stdout": done.stdout, "stderr": done.stderr}
    fs.invalidate_cache()
    written = fs.find("lab/out")
    assert any(p.endswith(".parquet") for p in written) and any(p.endswith("summary.json")
                                                                for p in written)
    for path in written:  # summary.json, config.json, commit records, drift, Parquet bytes
        blobs[f"s3://{path}"] = fs.cat_file(path)
        if path.endswith(".parquet"):
            metadata = pq.read_schema(fs.open(path)).metadata or {}
            blobs[f"s3://{path} (key-value metadata)"] = b"\n".join(
                key + b"=" + value for key, value in metadata.items())
    ray_logs = [p for p in Path(ray_tmp).rglob("*") if p.is_file() and "logs" in p.parts]
    assert ray_logs, f"no Ray session logs under {ray_tmp}"
    blobs.update({str(p): p.read_bytes() for p in ray_logs})
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not leaks(blobs, secrets)

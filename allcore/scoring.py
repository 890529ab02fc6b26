"""Batch scoring without Ray: run config, output schema, accounting, and the commit protocol.

The output is a Hive-partitioned Parquet table under ``<out>/predictions/``. A file becomes part
of the table only when a commit record under ``<out>/_commits/`` lists it; those records are also
the incremental ledger, so a crash at any point leaves nothing that a rerun would score twice.
Layout (see docs/SCORING.md)::

    <out>/_staging/<run_id>/part-<run_id>-<chunk>.parquet         written first, never read
    <out>/predictions/scored_date=YYYY-MM-DD/part-<run_id>-<chunk>.parquet
    <out>/_commits/<run_id>-<chunk>.json                          files, row counts, input keys
    <out>/_runs/<run_id>/{config.json, manifest.json, _SUCCESS}
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import itertools
import json
import os
import posixpath
import re
import socket
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from allcore.io import FileInfo, filesystem, iter_image_files, join, stat_file

SCHEMA_METADATA_KEY = b"allcore.schema"
SCHEMA_VERSION = 1
OK, ERROR = "ok", "error"
FIELD, CELL = "field", "cell"  # row_kind: one field row per input, plus cell rows with --per-cell


@dataclass(frozen=True)
class ScoringConfig:
    """One scoring run. Written to ``<out>/_runs/<run_id>/config.json`` next to the outputs."""

    model: str  # artifact folder or s3:// prefix
    input: str  # image folder or s3:// prefix, listed recursively (or the base for --manifest)
    output: str  # table root, local or s3://
    manifest: str | None = None  # text file, one path per line, instead of listing --input
    full: bool = False  # rescore inputs already committed for this model
    batch_size: int = 64
    actors: tuple[int, int] = (1, 2)  # inference actor pool (min, max); Ray autoscales between
    max_error_rate: float = 0.05  # fail the run (after committing) when errors / scored exceed it
    specimen_pattern: str | None = None  # regex on source_uri; group 1 (or whole match) = specimen
    commit_every: int = 4096  # result rows per commit (cells count with --per-cell): bounds the work a crash loses
    max_pixels: int = 40_000_000  # decompression-bomb guard passed to decode_rgb
    fast: bool = False  # fast inference path (ONNX Runtime / AMP), see docs/PERFORMANCE.md
    gpu: bool = False  # one GPU per actor even if none is up yet (autoscaling GPU workers)
    per_cell: bool = False  # also one row per detected white cell (allcore.percell, docs/SCORING.md)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.commit_every < 1:
            raise ValueError("batch_size and commit_every must be at least 1")
        low, high = self.actors
        if not 1 <= low <= high:
            raise ValueError(f"actors must be MIN,MAX with 1 <= MIN <= MAX, got {self.actors}")
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise ValueError(f"max_error_rate must be in [0, 1], got {self.max_error_rate}")
        if self.specimen_pattern is not None:
            try:
                groups = re.compile(self.specimen_pattern).groups
            except re.error as exc:
                raise ValueError(f"specimen_pattern {self.specimen_pattern!r} is not a valid "
                                 f"regex: {exc}") from None
            if groups > 1:
                raise ValueError("specimen_pattern may have at most one capture group "
                                 f"(the specimen id); {self.specimen_pattern!r} has {groups}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "ScoringConfig":
        values = json.loads(text)
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown scoring config keys {sorted(unknown)}; "
                             f"valid keys: {[f.name for f in dataclasses.fields(cls)]}")
        if "actors" in values:
            values["actors"] = tuple(values["actors"])
        return cls(**values)


# ---------------------------------------------------------------- schema

COLUMN_DESCRIPTIONS: dict[str, str] = {
    "run_id": "scoring run that wrote the row (UTC start time + random suffix)",
    "scored_at": "UTC time the row's chunk was scored",
    "model_name": "model architecture name from the model card",
    "model_version": "model version from the model card",
    "model_sha256": "sha256 of the model weights (the incremental ledger is per model_sha256)",
    "source_uri": "local path or s3:// uri of the input image",
    "source_size": "input size in bytes at listing time (-1 if it could not be listed)",
    "source_mtime": "mtime in ns (local) or ETag (s3) at listing time: the change detector",
    "content_sha256": "sha256 of the bytes actually scored (null if unreadable)",
    "specimen_id": "specimen the image belongs to (regex on source_uri; default parent folder)",
    "cell_id": "deterministic id: content_sha256[:16]:x0,y0,x1,y1 for a cell, "
               "content_sha256[:16]:field for the whole field (null for error rows)",
    "row_kind": "'field' (one per input, also for errors) or 'cell' (one per detected white cell, "
                "--per-cell runs only)",
    "box_x0": "cell box left, pixels of the original image (field rows: 0)",
    "box_y0": "cell box top (field rows: 0)",
    "box_x1": "cell box right, exclusive (field rows: width)",
    "box_y1": "cell box bottom, exclusive (field rows: height)",
    "cell_count": "white cells found in the field (field rows of --per-cell runs; else null)",
    "cell_area": "cell area in pixels (cell rows; else null)",
    "circularity": "4 pi area / perimeter^2 of the cell, 1 for a disk (cell rows; else null)",
    "nucleus_cell_ratio": "nucleus area / cell area (cell rows where the nucleus is distinct)",
    "pred_label": "class with the highest probability (null for error rows)",
    "confidence": "probability of pred_label (null for error rows)",
    "blast_probability": "sum of the probabilities of the label set's blast classes (all4: "
                         "Early+Pre+Pro; binary: malignant; all_hem: ALL); null for error rows",
    "is_blast": "pred_label is a blast class (null for error rows)",
    "status": "'ok' or 'error'",
    "error": "why the input could not be scored (null for ok rows)",
    "note": "remark on an ok row, e.g. 'no cells found' on a --per-cell field row without cells",
}
PROB_DESCRIPTION = "softmax probability of class {cls!r} (null for error rows)"


def prob_column(cls: str) -> str:
    return f"prob_{cls}"


def output_schema(classes: Iterable[str], model_summary: dict) -> pa.Schema:
    """Arrow schema of a predictions file; column descriptions and the model card summary are
    stored in the schema metadata so a file explains itself without this repository."""
    classes = list(classes)
    types = {
        "run_id": pa.string(), "scored_at": pa.timestamp("us", tz="UTC"),
        "model_name": pa.string(), "model_version": pa.string(), "model_sha256": pa.string(),
        "source_uri": pa.string(), "source_size": pa.int64(), "source_mtime": pa.string(),
        "content_sha256": pa.string(), "specimen_id": pa.string(), "cell_id": pa.string(),
        "row_kind": pa.string(),
        "box_x0": pa.int32(), "box_y0": pa.int32(), "box_x1": pa.int32(), "box_y1": pa.int32(),
        "cell_count": pa.int32(), "cell_area": pa.int32(), "circularity": pa.float32(),
        "nucleus_cell_ratio": pa.float32(),
        "pred_label": pa.string(), "confidence": pa.float32(),
        "blast_probability": pa.float32(), "is_blast": pa.bool_(),
        "status": pa.string(), "error": pa.string(), "note": pa.string(),
    }
    names = list(types)
    at = names.index("confidence") + 1
    fields = [pa.field(n, types[n]) for n in names[:at]]
    fields += [pa.field(prob_column(c), pa.float32()) for c in classes]
    fields += [pa.field(n, types[n]) for n in names[at:]]
    descriptions = dict(COLUMN_DESCRIPTIONS)
    descriptions.update({prob_column(c): PROB_DESCRIPTION.format(cls=c) for c in classes})
    metadata = {"version": SCHEMA_VERSION, "columns": descriptions, "model": model_summary,
                "partitioning": "hive: scored_date=YYYY-MM-DD (UTC date of scored_at)"}
    return pa.schema(fields, metadata={SCHEMA_METADATA_KEY: json.dumps(metadata).encode()})


def card_summary(card) -> dict:
    """What a predictions file records about the model that produced it."""
    return {"model_name": card.model_name, "model_version": str(card.model_version),
            "weights_sha256": card.weights_sha256, "classes": list(card.classes),
            "data_config": dict(card.data_config)}


def specimen_id(uri: str, pattern: str | None) -> str | None:
    """Group 1 of ``pattern`` (or the whole match) searched in ``uri``; default: parent folder."""
    if pattern is None:
        return posixpath.basename(posixpath.dirname(uri.replace(os.sep, "/"))) or None
    match = re.search(pattern, uri)
    if match is None:
        return None
    return match.group(1) if match.re.groups else match.group(0)


def cell_id(sha: str, row_kind: str, box: tuple[int, int, int, int]) -> str:
    """Deterministic row id: the same bytes and box give the same id in every run and model."""
    return f"{sha[:16]}:field" if row_kind == FIELD else f"{sha[:16]}:{','.join(map(str, box))}"


def build_output_table(scored: pa.Table, *, run_id: str, scored_at: dt.datetime,
                       model_summary: dict, specimen_pattern: str | None,
                       blast_classes: Iterable[str] = ()) -> pa.Table:
    """Turn the inference stage's columns into rows of the output schema.

    ``scored`` has source_uri, source_size, source_mtime, content_sha256, width, height, status,
    error, pred_label, confidence and prob_<class>; error rows carry NaN/None predictions,
    stored as nulls. Per-cell batches (``allcore.percell.prepare_cells_batch``) add row_kind,
    box_*, cell_count, cell_area, circularity, nucleus_cell_ratio and note (NaN / -1 = null).
    Rows are sorted by source_uri, field row first, so a chunk's file is reproducible.
    """
    per_cell = "row_kind" in scored.column_names
    scored = scored.sort_by([("source_uri", "ascending")] + (
        [("row_kind", "descending"), ("box_y0", "ascending"), ("box_x0", "ascending")]
        if per_cell else []))
    classes = model_summary["classes"]
    blast = [c for c in classes if c in set(blast_classes)]
    schema = output_schema(classes, model_summary)
    n = scored.num_rows
    ok = np.array([s == OK for s in scored["status"].to_pylist()], dtype=bool)

    def text(name: str) -> list[str | None]:
        """Missing strings arrive as None, "" or NaN (Ray Data turns an all-None column into
        floats when it re-batches): all become null."""
        return [v if isinstance(v, str) and v else None for v in scored[name].to_pylist()]

    sha = text("content_sha256")
    uris = scored["source_uri"].to_pylist()
    kinds = scored["row_kind"].to_pylist() if per_cell else [FIELD] * n

    def only_ok(values) -> list:
        return [v if good else None for v, good in zip(values, ok)]

    def values(name: str) -> np.ndarray:
        return scored[name].to_numpy(zero_copy_only=False)

    def numeric(name: str, null_below: float | None = None) -> pa.Array:
        """NaN (or values below ``null_below``) from error rows would read as numbers: null them."""
        data = values(name)
        missing = ~ok | np.isnan(data.astype(np.float64))
        if null_below is not None:
            missing |= data < null_below
        return pa.array(data, mask=missing)

    boxes = ([values(f"box_{k}").tolist() for k in ("x0", "y0", "x1", "y1")] if per_cell
             else [[0] * n, [0] * n, values("width").tolist(), values("height").tolist()])
    blast_probability = (sum(values(prob_column(c)).astype(np.float64) for c in blast)
                         if blast else np.full(n, np.nan))
    labels = scored["pred_label"].to_pylist()

    columns = {
        "run_id": [run_id] * n, "scored_at": [scored_at] * n,
        "model_name": [model_summary["model_name"]] * n,
        "model_version": [model_summary["model_version"]] * n,
        "model_sha256": [model_summary["weights_sha256"]] * n,
        "source_uri": uris, "source_size": scored["source_size"],
        "source_mtime": scored["source_mtime"], "content_sha256": sha,
        "specimen_id": [specimen_id(u, specimen_pattern) for u in uris],
        "cell_id": only_ok(cell_id(s, k, b) if s else None
                           for s, k, b in zip(sha, kinds, zip(*boxes))),
        "row_kind": kinds,
        **{f"box_{k}": only_ok(b) for k, b in zip(("x0", "y0", "x1", "y1"), boxes)},
        **({"cell_count": numeric("cell_count", null_below=0),
            "cell_area": numeric("cell_area", null_below=0),
            "circularity": numeric("circularity"),
            "nucleus_cell_ratio": numeric("nucleus_cell_ratio")} if per_cell else
           {name: [None] * n for name in ("cell_count", "cell_area", "circularity",
                                          "nucleus_cell_ratio")}),
        "pred_label": only_ok(labels),
        "confidence": numeric("confidence"),
        **{prob_column(c): numeric(prob_column(c)) for c in classes},
        "blast_probability": pa.array(blast_probability, mask=~ok | np.isnan(blast_probability)),
        "is_blast": [(label in blast) if good and blast else None
                     for label, good in zip(labels, ok)],
        "status": scored["status"],
        "error": [None if good else e for e, good in zip(text("error"), ok)],
        "note": text("note") if per_cell else [None] * n,
    }
    return pa.Table.from_arrays(
        [pa.array(columns[f.name], type=f.type) if isinstance(columns[f.name], list)
         else columns[f.name].cast(f.type) for f in schema], schema=schema)


# ---------------------------------------------------------------- inputs and accounting

def new_run_id(now: dt.datetime | None = None) -> str:
    now = now or dt.datetime.now(dt.timezone.utc)
    return f"{now:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def input_digest(uri: str, size: int, mtime_or_etag: str) -> bytes:
    """The ledger key of an input: cheap to get from a listing, and it changes whenever the file
    is replaced. Hashed to 16 bytes so a ledger of millions of inputs fits the driver's memory."""
    return hashlib.blake2b(f"{uri}\x00{int(size)}\x00{mtime_or_etag}".encode(),
                           digest_size=16).digest()


def stat_input(uri: str) -> FileInfo:
    """FileInfo for one listed path, with the same change detector as ``iter_image_files``.
    A path that cannot be stat'ed keeps size -1, so the read stage records why as an error row.
    """
    try:
        return stat_file(uri)
    except OSError:
        return FileInfo(uri, -1, "")


def iter_manifest(manifest: str, base: str) -> Iterator[FileInfo]:
    """Inputs named in a manifest: one path or s3:// uri per line; relative paths are joined
    onto ``base``; blank lines and lines starting with '#' are skipped."""
    base = base if base.startswith("s3://") else os.path.abspath(base)  # workers' cwd differs
    fs, path = filesystem(manifest)
    with fs.open(path, "rt") as lines:
        for line in lines:
            name = line.strip()
            if name and not name.startswith("#"):
                yield stat_input(name if name.startswith(("/", "s3://")) else join(base, name))


def iter_inputs(config: ScoringConfig) -> Iterator[FileInfo]:
    if config.manifest:
        return iter_manifest(config.manifest, config.input)
    return iter_image_files(config.input)


def chunked(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of ``size`` items: the driver never holds more than one at a time."""
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


@dataclass
class RunSummary:
    """Accounting for one run. Invariant: listed == ok + errors + skipped."""

    run_id: str
    output: str
    listed: int = 0
    ok: int = 0
    errors: int = 0
    skipped: int = 0  # already committed for this model (or listed twice)
    cells: int = 0  # cell rows written (--per-cell); not inputs, so not in the balance
    chunks: int = 0
    seconds: float = 0.0
    max_error_rate: float = 1.0

    @property
    def scored(self) -> int:
        return self.ok + self.errors

    @property
    def balanced(self) -> bool:
        return self.listed == self.ok + self.errors + self.skipped

    @property
    def error_rate(self) -> float:
        return self.errors / self.scored if self.scored else 0.0

    @property
    def failed(self) -> bool:
        return self.error_rate > self.max_error_rate or not self.balanced

    def line(self) -> str:
        rate = self.scored / self.seconds if self.seconds > 0 else 0.0
        return (f"run {self.run_id}: {self.listed} inputs = {self.ok} ok + {self.errors} errors "
                f"+ {self.skipped} skipped ({'balanced' if self.balanced else 'UNBALANCED'}); "
                f"error rate {self.error_rate:.2%} (max {self.max_error_rate:.2%}); "
                f"{rate:.1f} images/s; {self.chunks} chunks committed to {self.output}")

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "scored": self.scored, "balanced": self.balanced,
                "error_rate": self.error_rate, "failed": self.failed}


# ---------------------------------------------------------------- commit protocol

WRITER_LEASE_SECONDS = 12 * 3600  # a lock older than this is taken over even from another host


class WriterLockedError(RuntimeError):
    """Another scoring run is writing to the same output root."""


@dataclass
class OutputStore:
    """The table root and its commit protocol. One writer per output root at a time (enforced
    by ``acquire_writer``): a run starts by deleting whatever an earlier crashed run left
    uncommitted, which would destroy a concurrent run's just-published files."""

    root: str
    fs: object = field(init=False, repr=False)
    path: str = field(init=False)

    def __post_init__(self) -> None:
        self.fs, self.path = filesystem(self.root)
        if not self.root.startswith("s3://"):
            self.root = self.path  # absolute, so the uris this store reports are too

    def _uri(self, path: str) -> str:
        return join(self.root, posixpath.relpath(path, self.path))

    def _p(self, *parts: str) -> str:
        return posixpath.join(self.path, *parts)

    def _write_atomic(self, path: str, data: bytes) -> None:
        """Readers see the whole file or nothing: an S3 PUT is atomic, a local rename too."""
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        if "s3" in self.fs.protocol:
            self.fs.pipe_file(path, data)
        else:
            tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
            self.fs.pipe_file(tmp, data)
            os.replace(tmp, path)

    def commit_records(self) -> list[dict]:
        records = []
        for path in sorted(self.fs.glob(self._p("_commits", "*.json"))):
            records.append(json.loads(self.fs.cat_file(path)))
        return records

    def acquire_writer(self, run_id: str) -> None:
        """Take ``_runs/_writer.lock`` for ``run_id``, or raise ``WriterLockedError``.

        A lock left by a killed run is taken over when its process is gone (same host) or its
        lease has expired (any host). Best effort on S3, which has no create-if-absent here.
        """
        path = self._p("_runs", "_writer.lock")
        if self.fs.exists(path):
            holder = json.loads(self.fs.cat_file(path))
            age = time.time() - holder["since"]
            same_host = holder["host"] == socket.gethostname()
            if age < WRITER_LEASE_SECONDS and (not same_host or _process_alive(holder["pid"])):
                raise WriterLockedError(
                    f"run {holder['run_id']} (pid {holder['pid']} on {holder['host']}) has been "
                    f"writing to {self.root} for {age / 60:.0f} min; wait for it to finish, or if "
                    f"it is dead delete {self._uri(path)}")
        self._write_atomic(path, json.dumps({"run_id": run_id, "host": socket.gethostname(),
                                             "pid": os.getpid(), "since": time.time()}).encode())

    def release_writer(self, run_id: str) -> None:
        path = self._p("_runs", "_writer.lock")
        if self.fs.exists(path) and json.loads(self.fs.cat_file(path))["run_id"] == run_id:
            self.fs.rm(path)

    def recover(self) -> list[str]:
        """Delete staging leftovers and published files no commit record lists (a crash between
        publishing and recording); their inputs are not in the ledger, so they get rescored."""
        committed = {f["path"] for r in self.commit_records() for f in r["files"]}
        orphans = [p for p in self.fs.glob(self._p("predictions", "**", "*.parquet"))
                   if posixpath.relpath(p, self.path) not in committed]
        if self.fs.exists(self._p("_staging")):
            self.fs.rm(self._p("_staging"), recursive=True)
        for orphan in orphans:
            self.fs.rm(orphan)
        return [self._uri(p) for p in orphans]

    def ledger(self, model_sha256: str) -> set[bytes]:
        """``input_digest`` of every input committed for this model: what a run skips."""
        return {input_digest(*key) for r in self.commit_records()
                if r["model_sha256"] == model_sha256 for key in r["inputs"]}

    def write_config(self, run_id: str, config: ScoringConfig) -> None:
        self._write_atomic(self._p("_runs", run_id, "config.json"), config.to_json().encode())

    def commit(self, table: pa.Table, *, run_id: str, chunk: int, model_sha256: str,
               scored_at: dt.datetime) -> dict:
        """Stage, publish, then record one chunk; the record is what makes it count. The
        record lists the inputs of exactly the rows in the file: they become the ledger. Counts
        and inputs come from the field rows (one per input), so --per-cell cell rows do not
        inflate the accounting; the caller commits an input's field and cell rows together."""
        name = f"part-{run_id}-{chunk:05d}.parquet"
        staged = self._p("_staging", run_id, name)
        relative = posixpath.join("predictions", f"scored_date={scored_at:%Y-%m-%d}", name)
        self.fs.makedirs(posixpath.dirname(staged), exist_ok=True)
        with self.fs.open(staged, "wb") as handle:
            pq.write_table(table, handle)
        self.fs.makedirs(posixpath.dirname(self._p(relative)), exist_ok=True)
        self.fs.mv(staged, self._p(relative))
        field_rows = table.filter(pc.equal(table["row_kind"], FIELD))
        status = field_rows["status"].to_pylist()
        record = {"run_id": run_id, "chunk": chunk, "model_sha256": model_sha256,
                  "committed_at": dt.datetime.now(dt.timezone.utc).isoformat(),
                  "files": [{"path": relative, "rows": table.num_rows}],
                  "counts": {OK: status.count(OK), ERROR: status.count(ERROR),
                             CELL: table.num_rows - field_rows.num_rows},
                  "inputs": [list(k) for k in zip(*(field_rows[c].to_pylist() for c in
                                                   ("source_uri", "source_size", "source_mtime")))]}
        self._write_atomic(self._p("_commits", f"{run_id}-{chunk:05d}.json"),
                           json.dumps(record).encode())
        return record

    def finish(self, summary: RunSummary) -> None:
        """Run manifest always; ``_SUCCESS`` only when the run passed its error-rate check."""
        self._write_atomic(self._p("_runs", summary.run_id, "manifest.json"),
                           json.dumps(summary.to_dict(), indent=2).encode())
        if not summary.failed:
            self._write_atomic(self._p("_runs", summary.run_id, "_SUCCESS"), b"")
        if self.fs.exists(self._p("_staging", summary.run_id)):
            self.fs.rm(self._p("_staging", summary.run_id), recursive=True)

    def committed_files(self) -> list[str]:
        """URIs of the table's files: what a strict reader should read."""
        return [join(self.root, f["path"]) for r in self.commit_records()
                for f in r["files"]]


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True

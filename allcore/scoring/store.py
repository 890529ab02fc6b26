"""The output root and its commit protocol: one writer at a time, every file published the same
way (staged, then moved into place), and a chunk counted only once its commit record exists.

The output is a Hive-partitioned Parquet table under ``<out>/predictions/``. A file becomes part
of the table only when a commit record under ``<out>/_commits/`` lists it; those records also
name the incremental ledger, so a crash at any point leaves nothing that a rerun would score twice.
A commit record names its table file and its ledger file (the digests of its inputs); the
ledger of a model is read from those 16-byte keys, not from the records. Layout (docs/SCORING.md)::

    <out>/_staging/<run_id>/...                                   written first, never read
    <out>/predictions/scored_date=YYYY-MM-DD/part-<run_id>-<chunk>.parquet
    <out>/specimen_summary/scored_date=YYYY-MM-DD/part-<run_id>.parquet    (--per-cell)
    <out>/_commits/<run_id>-<chunk>.json                          files, row counts, ledger file
    <out>/_ledger/<model_sha256>/<run_id>-<chunk>.parquet         digests of the chunk's inputs
    <out>/_runs/<run_id>/{config.json, summary.json, _SUCCESS}
    <out>/_runs/<run_id>/specimens_summarised_by                  a killed run's, by the one after

The parts it relies on read alone: the writer lock (``allcore.scoring.lock``), the ledger's
digests (``allcore.scoring.ledger``) and the chunks of whole inputs a commit takes
(``allcore.scoring.chunks``).
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import posixpath
import uuid
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from allcore.errors import OutputUnwritableError
from allcore.imaging.files import filesystem, join, write_atomic
from allcore.scoring.config import ScoringConfig
from allcore.scoring.inputs import input_digest
from allcore.scoring.ledger import Ledger, ledger_digests, ledger_table, settled_inputs
from allcore.scoring.lock import WriterLock
from allcore.scoring.rows import CELL, ERROR, INPUT_KINDS, OK

SUMMARISED_BY = "specimens_summarised_by"  # in a killed run's _runs/<run_id>/ (unsummarised_runs)
LEDGER_FILES_PER_READ = 256  # fetched concurrently (s3fs), parsed, then their bytes dropped


def new_run_id(now: dt.datetime | None = None) -> str:
    now = now or dt.datetime.now(dt.timezone.utc)
    return f"{now:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


_OUTPUT_ADVICE = {
    errno.EROFS: "the file system is read-only: choose a writable --output or remount it",
    errno.EACCES: "permission denied: give this job write access or choose another --output",
    errno.EPERM: "permission denied: give this job write access or choose another --output",
    errno.ENOSPC: "the disk is full: free space (committed chunks are kept) and run again; "
                  "the rerun scores only what was not committed",
    errno.EDQUOT: "the disk quota is exhausted: free space and run again",
    errno.ENOTDIR: "a file is in the way where a folder of the output should be: move it or "
                   "choose another --output",
    errno.EEXIST: "a file is in the way where a folder of the output should be: move it or "
                  "choose another --output",
}


def output_error(root: str, exc: OSError) -> OutputUnwritableError:
    """One line that says what happened to the output and what to do."""
    advice = _OUTPUT_ADVICE.get(exc.errno, "check the path, its permissions and free space")
    where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
    return OutputUnwritableError(f"cannot write to {root}{where}: {exc.strerror or exc}; {advice}")


@dataclass
class OutputStore:
    """The table root and its commit protocol. One writer per output root at a time (enforced
    by ``acquire_writer``, ``allcore.scoring.lock``): a run starts by deleting whatever an
    earlier crashed run left uncommitted, which would destroy a concurrent run's just-published
    files."""

    root: str
    fs: object = field(init=False, repr=False)
    path: str = field(init=False)
    writer_lock: WriterLock = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.fs, self.path = filesystem(self.root)
        if not self.root.startswith("s3://"):
            self.root = self.path  # absolute, so the uris this store reports are too
        self.writer_lock = WriterLock(self.fs, self._p("_runs", "_writer.lock"),
                                      self.uri("_runs/_writer.lock"), self.root)

    def uri(self, relative: str) -> str:
        return join(self.root, relative)

    def _p(self, *parts: str) -> str:
        return posixpath.join(self.path, *parts)

    def publish(self, table: pa.Table, relative: str, *, run_id: str) -> str:
        """Write ``table`` to ``<root>/<relative>`` so that readers see the whole file or none:
        written under ``_staging/<run_id>/`` first, then moved into place. Returns ``relative``.
        The one way a Parquet file enters the output root."""
        staged = self._p("_staging", run_id, f"{uuid.uuid4().hex[:8]}-{posixpath.basename(relative)}")
        self.fs.makedirs(posixpath.dirname(staged), exist_ok=True)
        with self.fs.open(staged, "wb") as handle:
            pq.write_table(table, handle)
        self.fs.makedirs(posixpath.dirname(self._p(relative)), exist_ok=True)
        self.fs.mv(staged, self._p(relative))
        return relative

    def commit_records(self) -> list[dict]:
        """Every commit record, in name order (read in one concurrent batch on S3)."""
        return [json.loads(data) for data in self._cat(self.fs.glob(self._p("_commits", "*.json")))]

    def _cat(self, paths: list[str]) -> list[bytes]:
        """The bytes of ``paths`` in sorted order; s3fs fetches a list concurrently."""
        paths = sorted(paths)
        contents = self.fs.cat(paths) if paths else {}
        return [contents[path] for path in paths]

    def acquire_writer(self, run_id: str) -> None:
        """Take ``_runs/_writer.lock`` for ``run_id`` (``WriterLock``), or raise
        ``WriterLockedError``; an ``OSError`` creating it is ``OutputUnwritableError``."""
        try:
            self.writer_lock.create(run_id)
        except OSError as exc:
            raise output_error(self.root, exc) from exc
        self.writer_lock.check_held(run_id)

    def release_writer(self, run_id: str) -> None:
        self.writer_lock.release(run_id)

    def recover(self) -> list[str]:
        """Delete staging leftovers and published files no commit record lists (a crash between
        publishing and recording); their inputs are not in the ledger, so they get rescored."""
        records = self.commit_records()
        committed = {f["path"] for r in records for f in r["files"]}
        committed.update(r["ledger"] for r in records if "ledger" in r)
        orphans = [p for folder in ("predictions", "_ledger")
                   for p in self.fs.glob(self._p(folder, "**", "*.parquet"))
                   if posixpath.relpath(p, self.path) not in committed]
        if self.fs.exists(self._p("_staging")):
            self.fs.rm(self._p("_staging"), recursive=True)
        for orphan in orphans:
            self.fs.rm(orphan)
        return [self.uri(posixpath.relpath(p, self.path)) for p in orphans]

    def ledger(self, model_sha256: str) -> Ledger:
        """``input_digest`` of every input committed for this model: what a run skips. Read from
        the ledger files the commit records name (16 bytes an input); records written before
        ledger files existed list their inputs themselves, and are read as well."""
        records = [r for r in self.commit_records() if r["model_sha256"] == model_sha256]
        paths = [self._p(r["ledger"]) for r in records if "ledger" in r]
        parts = []
        for start in range(0, len(paths), LEDGER_FILES_PER_READ):  # bytes of a few files at a time
            for data in self._cat(paths[start:start + LEDGER_FILES_PER_READ]):
                parts += ledger_digests(data)
        legacy = [input_digest(*key) for r in records for key in r.get("inputs", ())]
        if legacy:
            parts.append(np.array(legacy, "S16"))
        return Ledger.of_parts(parts)

    def write_config(self, run_id: str, config: ScoringConfig) -> None:
        try:
            write_atomic(self.fs, self._p("_runs", run_id, "config.json"),
                         config.to_json().encode())
        except OSError as exc:
            raise output_error(self.root, exc) from exc

    def commit(self, table: pa.Table, *, run_id: str, chunk: int, model_sha256: str,
               scored_at: dt.datetime) -> dict:
        """Publish, then record one chunk; the record is what makes it count. Beside the table
        file a ledger file holds the digests of exactly the inputs in it (``_ledger/<model>/``);
        the record names both, so the ledger of a model is the ledger files its records name.
        Counts and digests come from the field rows (one per input), so cell rows do not inflate
        the accounting; the caller commits an input's field and cell rows together
        (``CompleteInputs``). Inputs whose error may pass (``TRANSIENT_ERROR_KINDS``) are left
        out of the ledger file (counted as ``retry``): the next run tries them again without
        ``--full``.
        An ``OSError`` of the output (read-only, disk full) is raised as
        ``OutputUnwritableError``; the chunk is then not committed and the rerun scores it."""
        try:
            return self._commit(table, run_id=run_id, chunk=chunk, model_sha256=model_sha256,
                                scored_at=scored_at)
        except OSError as exc:
            raise output_error(self.root, exc) from exc

    def _commit(self, table: pa.Table, *, run_id: str, chunk: int, model_sha256: str,
                scored_at: dt.datetime) -> dict:
        relative = self.publish(table, posixpath.join(
            "predictions", f"scored_date={scored_at:%Y-%m-%d}", f"part-{run_id}-{chunk:05d}.parquet"),
            run_id=run_id)
        field_rows = table.filter(pc.is_in(table["row_kind"], pa.array(INPUT_KINDS)))  # one per input
        status = field_rows["status"].to_pylist()
        final = settled_inputs(field_rows)
        ledger = self.publish(ledger_table(final), posixpath.join(
            "_ledger", model_sha256, f"{run_id}-{chunk:05d}.parquet"), run_id=run_id)
        record = {"run_id": run_id, "chunk": chunk, "model_sha256": model_sha256,
                  "committed_at": dt.datetime.now(dt.timezone.utc).isoformat(),
                  "files": [{"path": relative, "rows": table.num_rows}], "ledger": ledger,
                  "counts": {OK: status.count(OK), ERROR: status.count(ERROR),
                             CELL: pc.sum(pc.equal(table["row_kind"], CELL)).as_py() or 0,
                             "retry": field_rows.num_rows - final.num_rows}}
        write_atomic(self.fs, self._p("_commits", f"{run_id}-{chunk:05d}.json"),
                     json.dumps(record).encode())
        return record

    def finish(self, run_id: str, accounting: dict, *, passed: bool) -> None:
        """The run's accounting (``_runs/<run_id>/summary.json``) always; ``_SUCCESS`` only when
        the run passed its checks. Runs before this release wrote ``manifest.json`` instead."""
        write_atomic(self.fs, self._p("_runs", run_id, "summary.json"),
                     json.dumps(accounting, indent=2).encode())
        if passed:
            write_atomic(self.fs, self._p("_runs", run_id, "_SUCCESS"), b"")
        if self.fs.exists(self._p("_staging", run_id)):
            self.fs.rm(self._p("_staging", run_id), recursive=True)

    def run_summary(self, run_id: str) -> dict | None:
        """The accounting ``finish`` wrote for ``run_id``, or None for a run that never finished
        (or wrote ``manifest.json``, before this release)."""
        path = self._p("_runs", run_id, "summary.json")
        return json.loads(self.fs.cat_file(path)) if self.fs.exists(path) else None

    def unsummarised_runs(self, model_sha256: str) -> dict[str, list[str]]:
        """Runs of ``model_sha256`` that committed chunks and then died before their end (no
        ``summary.json``), whose specimens no later run has summarised: run id -> their table
        files (relative). A run writes its specimen summary after its last commit, so a kill in
        between leaves those specimens committed, skipped by every rerun, and unsummarised."""
        ended = {posixpath.basename(posixpath.dirname(path)) for name in ("summary.json", SUMMARISED_BY)
                 for path in self.fs.glob(self._p("_runs", "*", name))}
        runs: dict[str, list[str]] = {}
        for record in self.commit_records():
            if record.get("model_sha256") == model_sha256 and record["run_id"] not in ended:
                runs.setdefault(record["run_id"], []).extend(f["path"] for f in record["files"])
        return runs

    def mark_summarised(self, run_ids: list[str], by_run_id: str) -> None:
        """Say that ``by_run_id``'s specimen summary covers these killed runs' specimens."""
        for run_id in run_ids:
            write_atomic(self.fs, self._p("_runs", run_id, SUMMARISED_BY), by_run_id.encode())

    def column_values(self, relative_paths: list[str], column: str) -> set:
        """The distinct non-null values of ``column`` in these published table files."""
        values = set()
        for path in relative_paths:
            values.update(pq.read_table(self._p(path), columns=[column],
                                        filesystem=self.fs)[column].drop_null().to_pylist())
        return values

    def committed_files(self) -> list[str]:
        """URIs of the table's files: what a strict reader should read."""
        return [self.uri(f["path"]) for r in self.commit_records() for f in r["files"]]

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
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
import posixpath
import socket
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fsspec.implementations.local import LocalFileSystem

from allcore.errors import OutputUnwritableError, WriterLockedError
from allcore.io import TRANSIENT_ERROR_KINDS, filesystem, join, write_atomic
from allcore.scoring.config import ScoringConfig
from allcore.scoring.inputs import INPUT_KEY, input_digest
from allcore.scoring.table import CELL, ERROR, FIELD, INPUT_KINDS, OK, SLIDE, TILE

WRITER_LEASE_SECONDS = 12 * 3600  # a lock older than this is taken over even from another host
DIGEST = pa.binary(16)  # input_digest, as stored in the ledger files
SUMMARISED_BY = "specimens_summarised_by"  # in a killed run's _runs/<run_id>/ (unsummarised_runs)
LEDGER_FILES_PER_READ = 256  # fetched concurrently (s3fs), parsed, then their bytes dropped


class Ledger:
    """The ``input_digest`` of every input committed for one model, as one sorted array of
    16-byte strings (10M inputs are 160 MB, where a Python set of them took 4.5 GB), plus the
    inputs this run has taken on. Membership is asked a whole listing chunk at a time with a
    binary search over the digests' first 8 bytes as integers (``_prefix``: half the size, and
    numpy searches integers several times faster than byte strings), then decided on all 16."""

    def __init__(self, digests: np.ndarray | None = None):
        self._sort(np.sort(np.empty(0, "S16") if digests is None else np.asarray(digests, "S16")))
        self._taken: set[bytes] = set()

    def _sort(self, digests: np.ndarray) -> None:
        """Keep ``digests`` (sorted, byte-wise) and their prefixes."""
        self._sorted = digests
        self._prefix = _prefix(digests)

    @classmethod
    def of_parts(cls, parts: list[np.ndarray]) -> "Ledger":
        """The ledger of ``parts`` concatenated, sorted in place: at 10M inputs a sorted copy
        beside the concatenation would double the driver's peak memory."""
        ledger = cls()
        if parts:
            digests = np.concatenate(parts)
            digests.sort()
            ledger._sort(digests)
        return ledger

    def __len__(self) -> int:
        return len(self._sorted) + len(self._taken)

    def __iter__(self):
        yield from (bytes(d).ljust(16, b"\0") for d in self._sorted)  # numpy drops trailing NULs
        yield from self._taken

    def __contains__(self, digest: bytes) -> bool:
        return not self.take_new([digest], dry_run=True)[0]

    def take_new(self, digests: list[bytes], *, dry_run: bool = False) -> list[bool]:
        """For each digest: True when it is neither committed nor taken earlier in this run (nor
        earlier in ``digests``), and takes it (unless ``dry_run``). A path listed twice counts once."""
        query = np.array(digests, dtype="S16")
        committed = np.zeros(len(query), bool)
        if len(self._sorted):
            prefix, last = _prefix(query), len(self._sorted) - 1
            order = np.argsort(prefix)  # sorted keys let numpy narrow each search from the last
            first = np.empty(len(query), np.int64)
            first[order] = np.searchsorted(self._prefix, prefix[order])
            committed = self._sorted[np.minimum(first, last)] == query
            # a prefix several digests share (rare): look through all of them
            shared = ~committed & (first < last) & (self._prefix[np.minimum(first + 1, last)] == prefix)
            for at in np.flatnonzero(shared).tolist():
                end = np.searchsorted(self._prefix, prefix[at], side="right")
                committed[at] = bool((self._sorted[first[at]:end] == query[at]).any())
        new = (~committed).tolist()
        for at in np.flatnonzero(~committed).tolist():  # few: the inputs not committed yet
            new[at] = digests[at] not in self._taken
            if new[at] and not dry_run:
                self._taken.add(digests[at])
        return new


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


class CompleteInputs:
    """Holds scored rows until every row of their input has arrived, so a commit never splits an
    input's field row from its cell rows (Ray Data may reorder and re-batch rows of one input).
    Complete means: the field row, plus as many cell rows as its ``cell_count`` says (an error
    row, or a field row of a run without cells, needs none); for a slide, the slide row, as many
    tile rows as its ``tile_count`` says, and as many cell rows as those tiles' ``cell_count``
    add up to. A slide is thus committed only once all its tiles are scored."""

    def __init__(self) -> None:
        self._pending: list[pa.Table] = []

    @property
    def pending_rows(self) -> int:
        return sum(t.num_rows for t in self._pending)

    def add(self, table: pa.Table) -> pa.Table:
        """Rows of every input now complete, in arrival order; the rest stay pending."""
        rows = pa.concat_tables([*self._pending, table]) if self._pending else table
        keys = list(zip(*(rows[k].to_pylist() for k in INPUT_KEY)))
        kinds, counts = rows["row_kind"].to_pylist(), rows["cell_count"].to_pylist()
        tile_counts = (rows["tile_count"].to_pylist() if "tile_count" in rows.column_names
                       else [0] * rows.num_rows)
        has_input_row: set[tuple] = set()
        expected = Counter()  # cell and tile rows the input's field, slide and tile rows announce
        seen = Counter()
        for key, kind, count, tiles in zip(keys, kinds, counts, tile_counts):
            if kind in INPUT_KINDS:
                has_input_row.add(key)
            if kind == SLIDE:
                expected[key, TILE] += max(int(tiles), 0)
            elif kind in (FIELD, TILE):
                expected[key, CELL] += max(int(count), 0)
            if kind in (TILE, CELL):
                seen[key, kind] += 1
        done = np.array([key in has_input_row and all(seen[key, k] == expected[key, k] for k in (TILE, CELL))
                         for key in keys], dtype=bool)
        self._pending = [rows.filter(pa.array(~done))] if not done.all() else []
        return rows.filter(pa.array(done))


def whole_inputs(rows: pa.Table, limit: int) -> tuple[pa.Table, pa.Table]:
    """(the rows of the first inputs that fit in ``limit`` rows, the rest): a chunk never splits
    an input's field row from its cell rows, and holds at least one input even when that input
    alone has more than ``limit`` rows. Field runs (one row per input) get exactly ``limit``."""
    keys = list(zip(*(rows[k].to_pylist() for k in INPUT_KEY)))
    sizes = Counter(keys)  # rows per input, in order of first appearance
    taken, total = set(), 0
    for key, size in sizes.items():
        if taken and total + size > limit:
            break
        taken.add(key)
        total += size
    head = pa.array([key in taken for key in keys])
    return rows.filter(head), rows.filter(pc.invert(head))


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
        """Take ``_runs/_writer.lock`` for ``run_id``, or raise ``WriterLockedError``.

        The lock file is created only if absent, in one step: ``O_CREAT|O_EXCL`` locally, a
        conditional PUT (``If-None-Match: *``) on S3, so of two runs started at the same instant
        exactly one gets it. A lock left by a killed run is taken over when its process is gone
        (same host) or its lease has expired (any host): the stale file is removed and the
        create tried once more, so two runs taking over the same stale lock still race on the
        create. Stores that ignore the condition (rclone's S3 server) are checked by reading the
        lock back, which narrows the race there but cannot close it (docs/SCORING.md).
        """
        path = self._p("_runs", "_writer.lock")
        lock = json.dumps({"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(),
                           "since": time.time()}).encode()
        try:
            self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
            for attempt in range(2):
                if self._create_if_absent(path, lock):
                    break
                holder = _lock_holder(self.fs.cat_file(path))
                age = time.time() - holder["since"]
                same_host = holder["host"] == socket.gethostname()
                if attempt or (age < WRITER_LEASE_SECONDS
                               and (not same_host or _process_alive(holder["pid"]))):
                    raise WriterLockedError(
                        f"run {holder['run_id']} (pid {holder['pid']} on {holder['host']}) has "
                        f"been writing to {self.root} for {age / 60:.0f} min; wait for it to "
                        f"finish, or if it is dead delete {self.uri('_runs/_writer.lock')}")
                self.fs.rm(path)  # stale: its run is gone
        except OSError as exc:
            raise output_error(self.root, exc) from exc
        if _lock_holder(self.fs.cat_file(path))["run_id"] != run_id:
            raise WriterLockedError(f"another run took {self.uri('_runs/_writer.lock')} at the "
                                    "same instant; this run stops without writing anything")

    def _create_if_absent(self, path: str, data: bytes) -> bool:
        """Write ``path`` only if it does not exist; False if it does (atomic on both stores)."""
        if isinstance(self.fs, LocalFileSystem):
            try:
                descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(data)
            return True
        try:
            self.fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        return True

    def release_writer(self, run_id: str) -> None:
        path = self._p("_runs", "_writer.lock")
        if self.fs.exists(path) and json.loads(self.fs.cat_file(path))["run_id"] == run_id:
            self.fs.rm(path)

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
                column = pq.ParquetFile(pa.BufferReader(data)).read(columns=["digest"])["digest"]
                parts += [np.frombuffer(c.buffers()[1], "S16")[c.offset:c.offset + len(c)]
                          for c in column.chunks]
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
        final = _final_inputs(field_rows)
        ledger = self.publish(pa.table({"digest": pa.array(
            [input_digest(*key) for key in zip(*(final[c].to_pylist() for c in INPUT_KEY))],
            DIGEST)}), posixpath.join("_ledger", model_sha256, f"{run_id}-{chunk:05d}.parquet"),
            run_id=run_id)
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


def _lock_holder(data: bytes) -> dict:
    """The lock's holder; a lock another run has created but not yet filled in (empty) is fresh."""
    try:
        return json.loads(data)
    except json.JSONDecodeError:
        return {"run_id": "(starting)", "host": "?", "pid": -1, "since": time.time()}


def _final_inputs(field_rows: pa.Table) -> pa.Table:
    """The field rows that settle their input for this model: all but errors of a transient kind,
    which the ledger leaves out so the next run tries them again."""
    if "error_kind" not in field_rows.column_names:
        return field_rows
    transient = pc.is_in(field_rows["error_kind"], pa.array(sorted(TRANSIENT_ERROR_KINDS)))
    return field_rows.filter(pc.invert(pc.fill_null(transient, False)))


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _prefix(digests: np.ndarray) -> np.ndarray:
    """The first 8 bytes of each 16-byte digest as an integer, read big-endian so that the
    integers are in the same order as the digests sorted byte-wise, and stored in the machine's
    own byte order (numpy converts a non-native array on every search)."""
    return digests.view(">u8")[::2].astype(np.uint64) if len(digests) else np.empty(0, np.uint64)

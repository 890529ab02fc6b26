"""The writer lock: one scoring run writes to an output root at a time.

A run starts by deleting whatever an earlier crashed run left uncommitted, which would destroy a
concurrent run's just-published files; ``_runs/_writer.lock`` (run id, host, pid, since) keeps a
second run out. The file is created only if absent, in one step: ``O_CREAT|O_EXCL`` locally, a
conditional PUT (``If-None-Match: *``) on S3, so of two runs started at the same instant exactly
one gets it. A lock left by a killed run is taken over when its process is gone (same host) or
its lease has expired (any host): the stale file is removed and the create tried once more, so
two runs taking over the same stale lock still race on the create. Stores that ignore the
condition (rclone's S3 server) are checked by reading the lock back (``check_held``), which
narrows the race there but cannot close it (docs/SCORING.md, "The writer lock").
"""

from __future__ import annotations

import json
import os
import posixpath
import socket
import time
from dataclasses import dataclass

from fsspec.implementations.local import LocalFileSystem

from allcore.errors import WriterLockedError

WRITER_LEASE_SECONDS = 12 * 3600  # a lock older than this is taken over even from another host


@dataclass(frozen=True)
class WriterLock:
    """The lock file ``path`` on ``fs``; ``uri`` and ``root`` name it and its output root in
    errors. An ``OSError`` of the file system passes through (the store says what it means)."""

    fs: object
    path: str
    uri: str
    root: str

    def create(self, run_id: str) -> None:
        """Create the lock for ``run_id``, taking over a stale one, or raise ``WriterLockedError``."""
        lock = json.dumps({"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(),
                           "since": time.time()}).encode()
        self.fs.makedirs(posixpath.dirname(self.path), exist_ok=True)
        for attempt in range(2):
            if self._create_if_absent(lock):
                return
            holder = _lock_holder(self.fs.cat_file(self.path))
            age = time.time() - holder["since"]
            same_host = holder["host"] == socket.gethostname()
            if attempt or (age < WRITER_LEASE_SECONDS
                           and (not same_host or _process_alive(holder["pid"]))):
                raise WriterLockedError(
                    f"run {holder['run_id']} (pid {holder['pid']} on {holder['host']}) has "
                    f"been writing to {self.root} for {age / 60:.0f} min; wait for it to "
                    f"finish, or if it is dead delete {self.uri}")
            self.fs.rm(self.path)  # stale: its run is gone

    def check_held(self, run_id: str) -> None:
        """Read the lock back: on a store that ignores the create condition another run may have
        written it at the same instant."""
        if _lock_holder(self.fs.cat_file(self.path))["run_id"] != run_id:
            raise WriterLockedError(f"another run took {self.uri} at the same instant; this run "
                                    "stops without writing anything")

    def release(self, run_id: str) -> None:
        """Remove the lock if ``run_id`` holds it."""
        if self.fs.exists(self.path) and json.loads(self.fs.cat_file(self.path))["run_id"] == run_id:
            self.fs.rm(self.path)

    def _create_if_absent(self, data: bytes) -> bool:
        """Write the lock only if it does not exist; False if it does (atomic on both stores)."""
        if isinstance(self.fs, LocalFileSystem):
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(data)
            return True
        try:
            self.fs.pipe_file(self.path, data, mode="create")
        except FileExistsError:
            return False
        return True


def _lock_holder(data: bytes) -> dict:
    """The lock's holder; a lock another run has created but not yet filled in (empty) is fresh."""
    try:
        return json.loads(data)
    except json.JSONDecodeError:
        return {"run_id": "(starting)", "host": "?", "pid": -1, "since": time.time()}


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True

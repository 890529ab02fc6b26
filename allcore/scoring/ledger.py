"""The ledger: which inputs are already scored for a model, so a rerun skips them.

An input is keyed by ``input_digest`` (16 bytes of its uri, size and mtime or ETag). Every commit
publishes a ledger file beside its table file holding the digests of the inputs that chunk
settles (``ledger_table``); the ledger of a model is those files read back into one sorted array
(``Ledger``). Reading the files is the store's (``OutputStore.ledger``); this module owns the
digests: which rows settle their input, the file's one column, and membership.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from allcore.imaging.files import TRANSIENT_ERROR_KINDS
from allcore.scoring.inputs import INPUT_KEY, input_digest

DIGEST = pa.binary(16)  # input_digest, as stored in the ledger files


class Ledger:
    """The ``input_digest`` of every input committed for one model, as one sorted array of
    16-byte strings (one copy, 16 bytes an input, where a Python set of them would not fit the
    driver's memory at scale: docs/SCORING.md, "The ledger at scale"), plus the inputs this run
    has taken on. Membership is asked a whole listing chunk at a time with a binary search
    over the digests' first 8 bytes as integers (``_prefix``: half the size, and numpy searches
    integers several times faster than byte strings), then decided on all 16."""

    def __init__(self, digests: np.ndarray | None = None):
        self._sort(np.sort(np.empty(0, "S16") if digests is None else np.asarray(digests, "S16")))
        self._taken: set[bytes] = set()

    def _sort(self, digests: np.ndarray) -> None:
        """Keep ``digests`` (sorted, byte-wise) and their prefixes."""
        self._sorted = digests
        self._prefix = _prefix(digests)

    @classmethod
    def of_parts(cls, parts: list[np.ndarray]) -> "Ledger":
        """The ledger of ``parts`` concatenated, sorted in place: a sorted copy beside the
        concatenation would double the driver's peak memory."""
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


def settled_inputs(input_rows: pa.Table) -> pa.Table:
    """The input rows (one per input) that settle their input for this model: all but errors of a
    transient kind (``TRANSIENT_ERROR_KINDS``), which the ledger leaves out so the next run tries
    them again."""
    if "error_kind" not in input_rows.column_names:
        return input_rows
    transient = pc.is_in(input_rows["error_kind"], pa.array(sorted(TRANSIENT_ERROR_KINDS)))
    return input_rows.filter(pc.invert(pc.fill_null(transient, False)))


def ledger_table(settled: pa.Table) -> pa.Table:
    """A ledger file's contents: the digest of each of these inputs, one column."""
    return pa.table({"digest": pa.array(
        [input_digest(*key) for key in zip(*(settled[c].to_pylist() for c in INPUT_KEY))], DIGEST)})


def ledger_digests(data: bytes) -> list[np.ndarray]:
    """The digests of one ledger file's bytes, as views of its column's buffers (no copy)."""
    column = pq.ParquetFile(pa.BufferReader(data)).read(columns=["digest"])["digest"]
    return [np.frombuffer(c.buffers()[1], "S16")[c.offset:c.offset + len(c)] for c in column.chunks]


def _prefix(digests: np.ndarray) -> np.ndarray:
    """The first 8 bytes of each 16-byte digest as an integer, read big-endian so that the
    integers are in the same order as the digests sorted byte-wise, and stored in the machine's
    own byte order (numpy converts a non-native array on every search)."""
    return digests.view(">u8")[::2].astype(np.uint64) if len(digests) else np.empty(0, np.uint64)

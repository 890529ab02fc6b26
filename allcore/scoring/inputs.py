"""The inputs of a run: listed from a folder / prefix or read from an input list, and keyed for
the ledger by what a listing already knows (uri, size, mtime or ETag), so a rerun can skip
inputs without reading them."""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Iterable, Iterator

from allcore.imaging.files import (FileInfo, bad_name_entry, filesystem, iter_image_files, join,
                                   normalise_location, stat_file)
from allcore.scoring.config import ScoringConfig

# The columns that identify an input in every stage's batches, in the table and in the ledger.
INPUT_KEY = ("source_uri", "source_size", "source_mtime")


def input_digest(uri: str, size: int, mtime_or_etag: str) -> bytes:
    """The ledger key of an input: cheap to get from a listing, and it changes whenever the file
    is replaced. Hashed to 16 bytes so a ledger of millions of inputs fits the driver's memory."""
    return hashlib.blake2b(f"{uri}\x00{int(size)}\x00{mtime_or_etag}".encode(),
                           digest_size=16).digest()


def stat_input(uri: str) -> FileInfo:
    """FileInfo for one listed path, with the same change detector as ``iter_image_files``.
    A path that cannot be stat'ed keeps size -1, so the prepare stage records why as an error row.
    """
    try:
        return stat_file(uri)
    except OSError:
        return FileInfo(uri, -1, "")


def iter_input_list(input_list: str, base: str) -> Iterator[FileInfo]:
    """Inputs named in an input list (``--manifest``): one path or s3:// uri per line; relative
    paths are joined onto ``base`` and normalised (``good/../good/x.jpg`` is ``good/x.jpg``, so a
    file named twice is scored once); blank lines and lines starting with '#' are skipped."""
    base = base if base.startswith("s3://") else os.path.abspath(base)  # workers' cwd differs
    fs, path = filesystem(input_list)
    with fs.open(path, "rt", encoding="utf-8", errors="surrogateescape") as lines:
        for line in lines:
            name = line.strip()
            if name and not name.startswith("#"):
                uri = normalise_location(name if name.startswith(("/", "s3://")) else join(base, name))
                yield bad_name_entry(uri) or stat_input(uri)


def iter_inputs(config: ScoringConfig) -> Iterator[FileInfo]:
    if config.input_list:
        return iter_input_list(config.input_list, config.input)
    return iter_image_files(config.input)


def new_inputs(infos: Iterable[FileInfo], ledger, chunk_size: int
               ) -> Iterator[tuple[int, list[FileInfo]]]:
    """(number listed, the new ones) per chunk of ``chunk_size`` listed inputs: those whose key
    the ``ledger`` (``allcore.scoring.ledger.Ledger``) has not seen, each taken once."""
    for chunk in chunked(infos, chunk_size):
        new = ledger.take_new([input_digest(i.uri, i.size, i.mtime_or_etag) for i in chunk])
        yield len(chunk), [info for info, is_new in zip(chunk, new) if is_new]


def chunked(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of ``size`` items: the driver never holds more than one at a time."""
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk

"""The faults a job can end with, and the exit status of each: the README's exit-code table.

Every fault allcore raises derives from ``AllcoreError``. Those that stop a job early carry
their ``exit_status`` and are defined here, so this file is the whole table; ``job_main`` makes a
job's ``main`` end with one line on stderr (``Kind: message``, the message saying what to do)
and that status instead of a traceback. Faults that are handled where they are raised have no
status and live beside their handler: ``ImageDecodeError`` and ``SlideError`` become an input's
error row, ``UploadError`` and ``CorrectionError`` an HTTP answer of the review app. No Ray here:
``pipelines`` re-exports ``RayClusterUnreachableError``.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

# Exit statuses (README, "Exit status"). 2 is also argparse's status for a usage error.
OK = 0
UNEXPECTED = 1  # a traceback: a bug
ERROR_RATE = 2  # score: error rows above --max-error-rate, or the accounting did not balance
REVIEW_RATE = 3  # score: fields needing review above --max-review-rate
WRITER_LOCKED = 4
OUTPUT_UNWRITABLE = 5
ARTIFACT_INTEGRITY = 6
NOT_FOUND = 7
RAY_CLUSTER_UNREACHABLE = 8
WEIGHTS_UNAVAILABLE = 9
WRONG_MODEL_KIND = 10

# exceptions not ours that end a job the same way: a path given on the command line not found
FOREIGN_EXIT_STATUS: dict[type[BaseException], int] = {FileNotFoundError: NOT_FOUND}


class AllcoreError(Exception):
    """A fault allcore knows, whose message says what happened and what to do.
    ``exit_status``: what a job ends with (None: handled where raised, never ends a job)."""

    exit_status: int | None = None


class WriterLockedError(AllcoreError, RuntimeError):
    """Another scoring run is writing to the same output root."""

    exit_status = WRITER_LOCKED


class OutputUnwritableError(AllcoreError, RuntimeError):
    """The output root cannot be written (read-only, disk full, a file in the way, no access)."""

    exit_status = OUTPUT_UNWRITABLE


class ArtifactIntegrityError(AllcoreError, RuntimeError):
    """The artifact's files and card do not belong together (modified, corrupted, missing,
    mixed up)."""

    exit_status = ARTIFACT_INTEGRITY


class ModelCardError(ArtifactIntegrityError, ValueError):
    """The model card cannot be read by this allcore (not JSON, another schema_version, missing
    or unknown fields)."""


class RayClusterUnreachableError(AllcoreError, RuntimeError):
    """The cluster this process would join does not answer (a head stopped without `ray stop`
    leaves its address file behind, and ray.init then waits on it for minutes)."""

    exit_status = RAY_CLUSTER_UNREACHABLE


class WeightsUnavailableError(AllcoreError, RuntimeError):
    """Pretrained weights could not be found offline, downloaded, or verified."""

    exit_status = WEIGHTS_UNAVAILABLE


class ModelKindError(AllcoreError, ValueError):
    """A model artifact of the wrong kind for the option it was given to (a field model as
    ``--cell-model``): its files are fine, the choice is not."""

    exit_status = WRONG_MODEL_KIND


def exit_status(exc: BaseException) -> int | None:
    """The status a job ends with on ``exc``; None for a fault nobody expected (a bug)."""
    if isinstance(exc, AllcoreError):
        return exc.exit_status
    return next((status for kind, status in FOREIGN_EXIT_STATUS.items() if isinstance(exc, kind)),
                None)


def job_main(main: Callable[..., int]) -> Callable[..., int]:
    """``main`` of a job, ending on a known fault with one line on stderr (``Kind: message``)
    and its exit status; anything else still raises, with its traceback."""

    @functools.wraps(main)
    def run(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except Exception as exc:
            status = exit_status(exc)
            if status is None:
                raise
            print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
            return status

    return run

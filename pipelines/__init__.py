"""Ray Train / Ray Data wiring around the ``allcore`` domain library."""

import logging

import ray


def init_ray(*, verbose: bool = True) -> None:
    """Join the cluster of ``ray job submit`` / ``RAY_ADDRESS``, or start Ray in-process.
    ``verbose=False`` keeps Ray's INFO start-up lines out of the driver log."""
    if not ray.is_initialized():
        ray.init(logging_level=logging.INFO if verbose else logging.WARNING)

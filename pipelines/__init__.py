"""Ray Train / Ray Data wiring around the ``allcore`` domain library."""

import ray


def init_ray() -> None:
    """Join the cluster of ``ray job submit`` / ``RAY_ADDRESS``, or start Ray in-process."""
    if not ray.is_initialized():
        ray.init()

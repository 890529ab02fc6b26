"""Ray Train / Ray Data wiring around the ``allcore`` domain library."""

import logging
import os

import ray

# Ray starts its worker processes 15 steps nicer than the driver (its `worker_niceness` default),
# so that its own daemons stay responsive. The workers are where training and scoring run: on a
# node that also runs anything else at normal priority they then get a few percent of a core
# (docs/PERFORMANCE.md, "Ray Train overhead": 0.74-0.85x a plain loop before, measured against
# 15). A Ray that this process starts runs them at the driver's own priority; a cluster started
# with `ray start` keeps its setting (start it with RAY_worker_niceness=0 for the same).
WORKER_NICENESS = "0"
RAY_DEFAULT_WORKER_NICENESS = 15  # what a Ray started without it uses

# numpy asks the kernel for transparent huge pages for every array over 4 MB (madvise). Where
# the kernel then compacts memory to find one on first touch (a `[madvise]` in
# /sys/kernel/mm/transparent_hugepage/defrag, a common default), filling a fresh array costs ~5x
# more: the prepare stage makes new pixel columns for every batch, and they cost a per-cell field
# 4.3 of 37 CPU ms that way on the 2-core machine (docs/PERFORMANCE.md, "Per-cell scoring"). The
# workers of a Ray started here run without it; a cluster started with `ray start` keeps its
# environment (start it with NUMPY_MADVISE_HUGEPAGE=0 for the same).
NUMPY_HUGE_PAGES = "0"


def init_ray(*, verbose: bool = True, **init_kwargs) -> None:
    """Join the cluster of ``ray job submit`` / ``RAY_ADDRESS``, or start Ray in-process with its
    workers at the driver's priority (``WORKER_NICENESS``), their numpy without huge pages
    (``NUMPY_HUGE_PAGES``) and without the dashboard, which
    dies with the job anyway and took 1.8 of the 4.6 s Ray took to start on 2 cores
    (docs/PERFORMANCE.md): for a dashboard, start a cluster (``ray start --head``, README) and
    run the job on it. ``verbose=False`` keeps Ray's INFO start-up lines out of the driver log;
    ``init_kwargs`` go to ``ray.init``."""
    if not ray.is_initialized():
        os.environ.setdefault("RAY_worker_niceness", WORKER_NICENESS)  # read by a raylet started here
        os.environ.setdefault("NUMPY_MADVISE_HUGEPAGE", NUMPY_HUGE_PAGES)  # read by each worker's numpy
        init_kwargs.setdefault("include_dashboard", False)  # ignored when joining a cluster
        ray.init(logging_level=logging.INFO if verbose else logging.WARNING, **init_kwargs)

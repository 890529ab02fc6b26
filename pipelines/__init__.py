"""Ray Train / Ray Data wiring around the ``allcore`` domain library."""

import logging
import os
import socket

import ray
from ray._common.utils import get_ray_address_file
from ray._private.services import canonicalize_bootstrap_address  # what ray.init calls

from allcore.errors import RayClusterUnreachableError

# Ray starts its worker processes 15 steps nicer than the driver (its `worker_niceness` default),
# so that its own daemons stay responsive. The workers are where training and scoring run: on a
# node that also runs anything else at normal priority they then get a few percent of a core
# (docs/PERFORMANCE.md, "Ray Train overhead"). A Ray that this process starts runs them at the
# driver's own priority; a cluster started with `ray start` keeps its setting (start it with
# RAY_worker_niceness=0 for the same).
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


# What a Ray started here runs with: the settings above, and none of the telemetry that only
# the dashboard, the state API or Prometheus would read. An in-process Ray belongs to one job,
# dies with it and has no dashboard (``init_ray``), so nothing reads any of it, yet each is a
# periodic loop in every Ray process: task events (the state API's task list and timeline),
# metrics (Prometheus, through the dashboard agent), event-loop statistics, Ray Train's metrics
# and its watcher for spot-instance preemption notices (a single node: this machine). What they
# cost Ray Train on 2 cores is measured in docs/PERFORMANCE.md, "Ray Train overhead". A cluster
# started with `ray start` keeps its own environment.
IN_PROCESS_RAY_ENV = {
    "RAY_worker_niceness": WORKER_NICENESS,  # read by the raylet
    "NUMPY_MADVISE_HUGEPAGE": NUMPY_HUGE_PAGES,  # read by each worker's numpy
    "RAY_task_events_report_interval_ms": "0",
    "RAY_enable_metrics_collection": "0",
    "RAY_event_stats": "0",
    "RAY_TRAIN_METRICS_ENABLED": "0",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}

# Loggers whose INFO and WARNING lines are for their own developers, not for someone running a
# job (Ray's start-up and token-auth notes, Ray Train's worker-group and checkpoint lines, Ray
# Data's progress-bar notice, MLflow's database migrations): on the console only at ERROR unless
# verbose. Ray still writes its own logs to the session's log files.
QUIET_LOGGERS = ("ray", "ray.data", "ray.train", "mlflow", "alembic",
                 # set by its own name: ray.init's LoggingConfig puts "ray" back at the workers'
                 # level (WARNING) before it says that token auth is on
                 "ray._private.authentication.authentication_token_setup")

_started_here = False


def _check_reachable(address: str, address_file: str | None, seconds: float = 5) -> None:
    """Fail at once, saying what to do, where ``address`` (read from ``address_file`` if not
    None) takes no connection."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=seconds).close()
    except OSError as exc:
        if address_file:
            hint = (f"it is named by {address_file}, which a head stopped without `ray stop` "
                    f"leaves behind: start that head again, or delete the file to run with a Ray "
                    f"of this job's own")
        else:
            hint = "check RAY_ADDRESS (or --address) and that the head is running"
        raise RayClusterUnreachableError(f"no Ray cluster answers at {address} ({exc}); "
                                         f"{hint}") from None


def quiet_logs(verbose: bool) -> None:
    """``QUIET_LOGGERS`` at ERROR on this process's console (INFO when ``verbose``); MLflow,
    which sets its own level when imported, reads it from ``MLFLOW_LOGGING_LEVEL``."""
    level = "INFO" if verbose else "ERROR"
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", level)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(level)


def init_ray(*, verbose: bool = False, **init_kwargs) -> None:
    """Join the cluster of ``ray job submit`` / ``RAY_ADDRESS`` (or of a local ``ray start``), or
    start Ray in-process with ``IN_PROCESS_RAY_ENV`` (workers at the driver's priority, their
    numpy without huge pages, no telemetry) and without the dashboard, which dies with the job
    anyway and is a large share of Ray's start-up (docs/PERFORMANCE.md): for a
    dashboard, start a cluster (``ray start --head``, README) and run the job on it.
    ``verbose=False`` keeps Ray's own log lines off the console (``quiet_logs``: the driver's,
    and through ``ray.LoggingConfig`` those of Ray Train's and Ray Data's worker processes, whose
    output reaches the driver), leaving the job's own progress lines; ``init_kwargs`` go to
    ``ray.init``."""
    global _started_here
    if ray.is_initialized():
        return
    # ray.init's own test of whether it joins a cluster or starts one
    joins = canonicalize_bootstrap_address(init_kwargs.get("address"), init_kwargs.get("_temp_dir"))
    starts_here = joins is None
    if not starts_here:
        from_file = init_kwargs.get("address") is None and "RAY_ADDRESS" not in os.environ
        _check_reachable(joins, get_ray_address_file(init_kwargs.get("_temp_dir")) if from_file
                         else None)
    if starts_here:
        for name, value in IN_PROCESS_RAY_ENV.items():
            os.environ.setdefault(name, value)  # read by the processes ray.init starts
        init_kwargs.setdefault("include_dashboard", False)
    quiet_logs(verbose)
    if not verbose:
        # workers keep WARNING: allcore's own warnings there (a damaged ONNX export cache) matter
        init_kwargs.setdefault("logging_config", ray.LoggingConfig(log_level="WARNING"))
    ray.init(logging_level=logging.INFO if verbose else logging.ERROR, **init_kwargs)
    _started_here = starts_here


def ray_started_here() -> bool:
    """Whether ``init_ray`` started the Ray this process runs on (in-process, no dashboard)."""
    return _started_here

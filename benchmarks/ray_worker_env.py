"""What a Ray Train worker runs with, against the driver: torch threads, OMP_NUM_THREADS, CPU
affinity and niceness, and the CPU Ray's other processes (daemons, the Train controller) take
while the worker computes.

    python benchmarks/ray_worker_env.py [--default-niceness] [--seconds 10]

Ray is started as the jobs start it (``pipelines.init_ray``); ``--default-niceness`` starts it
with Ray's own worker niceness (15) instead. The worker asks for every CPU of the node, as
``pipelines.train`` does for one CPU worker, and multiplies 1024 x 1024 matrices for
30 + 2 x ``--seconds`` while the driver samples, over ``--seconds`` in the middle, the CPU
seconds of every process it started (GCS, raylet, dashboard agent, workers) and its own.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipelines import RAY_DEFAULT_WORKER_NICENESS  # noqa: E402


def worker_loop(config: dict) -> None:
    import torch

    x = torch.randn(1024, 1024)
    products, started = 0, time.perf_counter()
    while time.perf_counter() - started < config["seconds"]:
        x @ x
        products += 1
    print(f"worker: torch threads {torch.get_num_threads()}, OMP_NUM_THREADS "
          f"{os.environ.get('OMP_NUM_THREADS')}, affinity {sorted(os.sched_getaffinity(0))}, "
          f"niceness {os.nice(0)} (driver {config['driver_niceness']}), "
          f"{products / config['seconds']:.1f} matmuls/s", flush=True)


def cpu_by_process(seconds: float) -> list[tuple[float, str]]:
    """CPU seconds this process and each process it started spent over ``seconds``, largest
    first."""
    import psutil

    me = psutil.Process()
    processes = [me, *me.children(recursive=True)]
    before = {}
    for p in processes:
        try:
            before[p.pid] = sum(p.cpu_times()[:2])
        except psutil.Error:
            pass
    time.sleep(seconds)
    spent = []
    for p in processes:
        try:
            spent.append((sum(p.cpu_times()[:2]) - before[p.pid], " ".join(p.cmdline())[:80]))
        except (psutil.Error, KeyError):
            pass
    return sorted(spent, reverse=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--default-niceness", action="store_true")
    parser.add_argument("--seconds", type=float, default=10.0, help="sampling window")
    args = parser.parse_args(argv)
    if args.default_niceness:
        os.environ["RAY_worker_niceness"] = str(RAY_DEFAULT_WORKER_NICENESS)
    import ray
    import ray.train.torch
    from ray.train import RunConfig, ScalingConfig

    from pipelines import init_ray

    init_ray(verbose=False, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    cpus = int(ray.cluster_resources().get("CPU", 1))
    sampled: list = []
    # sample the middle of the worker's loop: after its start, before its end
    sampler = threading.Timer(30.0, lambda: sampled.extend(cpu_by_process(args.seconds)))
    sampler.start()
    ray.train.torch.TorchTrainer(
        worker_loop, train_loop_config={"seconds": 30 + 2 * args.seconds, "driver_niceness": os.nice(0)},
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": cpus}),
        run_config=RunConfig(storage_path=str(Path("/tmp") / "ray_worker_env"), name="env"),
    ).fit()
    sampler.join()
    total = sum(s for s, _ in sampled)
    print(f"CPU seconds over {args.seconds:.0f} s of the worker's loop, the driver and every "
          f"process it started (total {total:.1f}):")
    for seconds, command in sampled[:10]:
        print(f"  {seconds:6.2f}  {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where the CPU goes while Ray Train trains, against the plain loop: every process's CPU seconds
over the same window of each loop's training, on this machine.

    python -m benchmarks.train_cpu_share --data ../shared/data/all-taleqani/Original \\
        [--images 256 --input-size 96 --epochs 25 --warmup 20 --seconds 20]

Runs ``benchmarks/run.py``'s training section once (the plain loop, then Ray Train with one
worker, as ``jobs/train.py`` starts it), waits ``--warmup`` seconds into each child's training
and samples the CPU time of every process and the machine's idle time over ``--seconds``.
On a 2-core machine the loop's own process should hold nearly both cores; whatever the other
processes take (Ray's daemons and actors beside the worker) comes out of the training's share.
It also prints each training process's threads by name (Ray names its own), its niceness, CPU
affinity and how many of its threads computed, where Ray's worker could differ from the loop.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
# how each loop's training process shows itself in the process table
TRAINING_PROCESS = {"plain loop": "--child plain_train", "Ray Train worker": "RayTrainWorker"}


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) so far of every process this user can see, by pid."""
    seen = {}
    for process in psutil.process_iter(["pid", "cmdline", "name", "cpu_times"]):
        times, cmd = process.info["cpu_times"], process.info["cmdline"]
        if times is not None:
            seen[process.info["pid"]] = (" ".join(cmd or [process.info["name"]])[:80],
                                         times.user + times.system)
    return seen


def thread_seconds(pid: int) -> dict[int, tuple[str, float]]:
    """CPU seconds so far of each thread of ``pid``, with the thread's name (Ray names its
    threads: gRPC, task events, gloo; torch's threads keep the process's name)."""
    seen = {}
    for thread in psutil.Process(pid).threads():
        try:
            name = Path(f"/proc/{pid}/task/{thread.id}/comm").read_text().strip()
        except OSError:
            continue
        seen[thread.id] = (name, thread.user_time + thread.system_time)
    return seen


def training_pid(focus: str) -> int | None:
    """The pid of the process whose command line holds ``focus``, if one runs."""
    return next((p.info["pid"] for p in psutil.process_iter(["pid", "cmdline"])
                 if focus in " ".join(p.info["cmdline"] or [])), None)


def sample(label: str, pid: int, focus: str, seconds: float) -> None:
    before, idle_before, threads_before = cpu_seconds(), psutil.cpu_times().idle, thread_seconds(pid)
    time.sleep(seconds)
    after, idle = cpu_seconds(), psutil.cpu_times().idle - idle_before
    by_name: dict[str, float] = {}
    busy = 0  # threads computing for over a tenth of the window: torch's intra-op threads
    for tid, (name, t) in thread_seconds(pid).items():
        spent = t - threads_before.get(tid, (name, 0.0))[1]
        by_name[name] = by_name.get(name, 0.0) + spent
        busy += spent > 0.1 * seconds
    used = sorted(((t - before[pid][1], name) for pid, (name, t) in after.items() if pid in before),
                  reverse=True)
    training = sum(t for t, name in used if focus in name)
    others = sum(t for t, name in used if focus not in name)
    print(f"{label}: training process {training:.2f} CPU-s, every other process {others:.2f}, "
          f"machine idle {idle:.2f}, over {seconds:.0f} s on {psutil.cpu_count()} CPUs")
    for t, name in used[:12]:
        if t >= 0.05:
            print(f"  {t:6.2f}  {name}")
    print("  threads of the training process, by name: " + ", ".join(
        f"{name} {t:.2f}" for name, t in sorted(by_name.items(), key=lambda kv: -kv[1]) if t >= 0.005))
    process = psutil.Process(pid)
    print(f"  training process: {busy} busy threads, niceness {process.nice()} (this script "
          f"{psutil.Process().nice()}), CPU affinity {process.cpu_affinity()}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="class-folder tree of real images")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--input-size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=25, help="long enough to outlast the window")
    parser.add_argument("--warmup", type=float, default=20.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    bench = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.run", "--images", str(args.images), "--input-size",
         str(args.input_size), "--data", args.data, "--skip", "model,decode,baseline,score,rss10x",
         "--train-epochs", str(args.epochs), "--train-pairs", "1"],
        env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    waiting = dict(TRAINING_PROCESS)
    while bench.poll() is None and waiting:
        for label, focus in list(waiting.items()):
            if training_pid(focus) is not None:
                time.sleep(args.warmup)
                pid = training_pid(focus)  # after the warm-up: the process that trains now
                if pid is not None:
                    sample(label, pid, focus, args.seconds)
                    del waiting[label]
        time.sleep(0.5)
    output = bench.communicate()[0]
    print("\n".join(line for line in output.splitlines() if line.startswith("train:")))
    if waiting:
        print(f"not sampled (training ended first; raise --epochs): {', '.join(waiting)}")
    return 0 if bench.wait() == 0 and not waiting else 1


if __name__ == "__main__":
    sys.exit(main())

"""A Ray cluster of `ray start` processes on 127.0.0.1 for tests that submit jobs with
`ray job submit` (tests/test_job_submit.py, tests/test_multinode.py).

Other Ray instances may run on this machine at the same time (the test session's own, other
checkouts' tests), so every node takes free ports of its own and its own temp dir, and is
stopped by its own processes: its process group and every process its `ray start` started (Ray's
workers take process groups of their own), never `ray stop`, which stops every Ray of the machine.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
# every port a node opens, so none collides with another Ray's defaults
NODE_PORT_FLAGS = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                   "runtime-env-agent-port", "metrics-export-port", "node-manager-port",
                   "object-manager-port")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, log: Path, seconds: float = 90) -> None:
    """Until something listens on ``port``, or ``proc`` exits."""
    deadline = time.time() + seconds
    while time.time() < deadline and proc.poll() is None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(1)
    if proc.poll() is None:
        raise TimeoutError(f"nothing listens on port {port} after {seconds:.0f} s; see {log}")


class LocalRayCluster:
    """A head and worker nodes, each a `ray start --block` process in a process group of its own.

    ``env`` is what every node's processes (and so every job's driver and workers) see, as an
    instance's environment would on a real cluster; Ray 2.60's token auth is on, with a token
    made for this cluster (``RAY_AUTH_TOKEN``) that its nodes and the `ray` CLI calls share.
    Use as a context manager: leaving it stops every node still running.
    """

    def __init__(self, logs: Path, env: dict[str, str] | None = None):
        if not Path(RAY).exists():
            pytest.skip(f"no `ray` command beside {sys.executable} (pip install 'ray[default]')")
        self.logs = logs
        # a token of its own (as `ray get-auth-token --generate` makes), never ~/.ray/auth_token:
        # a fresh machine has none, and another cluster's must not open this one
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                    **(env or {})}
        self.env.pop("RAY_AUTH_TOKEN_PATH", None)
        self.env.pop("RAY_ADDRESS", None)
        self.nodes: dict[str, subprocess.Popen] = {}
        self._temp_dirs: list[str] = []
        self.gcs_port = self.dashboard_port = 0

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def __enter__(self) -> LocalRayCluster:
        return self

    def __exit__(self, *exc_info) -> None:
        for name in reversed(list(self.nodes)):
            self.stop_node(name)
        for directory in self._temp_dirs:
            shutil.rmtree(directory, ignore_errors=True)

    def _start(self, name: str, flags: list[str], port_flags: tuple[str, ...], num_cpus: int,
               env: dict[str, str], ready) -> dict[str, int]:
        """Start node ``name`` with a free port for each of ``NODE_PORT_FLAGS`` + ``port_flags``,
        wait for ``ready(log)`` (which returns early if the node exits), then until the node's own processes listen on every one of them;
        returns {flag: port}.

        A port is free when picked, not when the node binds it: another Ray starting on this
        machine meanwhile may take it, and then this node's agent fails to start while its raylet
        talks to the other Ray's agent (in CI: "403 Invalid authentication token" from another
        cluster's runtime env agent). Such a node is stopped and started again on new ports."""
        for attempt in range(1, 4):
            ports = {flag: free_port() for flag in (*port_flags, *NODE_PORT_FLAGS)}
            # AF_UNIX socket paths must stay short: a temp dir under /tmp, one per node (sharing
            # one, a second node unpacks a job's working dir again under its running driver)
            temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
            self._temp_dirs.append(temp_dir)
            log = self.logs / f"ray-{name}.log"
            self.logs.mkdir(parents=True, exist_ok=True)
            self.nodes[name] = subprocess.Popen(
                [RAY, "start", "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
                 f"--temp-dir={temp_dir}", *flags,
                 *(f"--{flag}={port}" for flag, port in ports.items())],
                env={**self.env, **env}, stdout=log.open("w"), stderr=subprocess.STDOUT,
                start_new_session=True)  # its own process group: killed alone, with all it started
            if name == "head":
                self.gcs_port, self.dashboard_port = ports["port"], ports["dashboard-port"]
            ready(log)
            # the metrics port is bound only with metrics collection on, which a test process
            # that started Ray in-process turned off in the environment the nodes inherit
            missing = _ports_not_listened_by(self.nodes[name], {
                port for flag, port in ports.items() if flag != "metrics-export-port"})
            if not missing:
                return ports
            print(f"node {name} (try {attempt}): ports {sorted(missing)} are not its own "
                  f"(exited: {self.nodes[name].poll() is not None}); starting it on new ports")
            self.stop_node(name)
        pytest.fail(f"node {name} did not start with ports of its own in 3 tries:\n"
                    f"{log.read_text()[-3000:]}")

    def start_head(self, num_cpus: int, env: dict[str, str] | None = None) -> None:
        """Start the head (GCS, dashboard, job agent) and wait for its dashboard."""
        self._start("head", ["--head", "--dashboard-host=127.0.0.1", "--include-dashboard=true"],
                    ("port", "dashboard-port", "ray-client-server-port"), num_cpus, env or {},
                    lambda log: _wait_for_port(self.dashboard_port, self.nodes["head"], log))

    def add_node(self, name: str, num_cpus: int) -> None:
        """Start a worker node joined to the head and wait until the cluster counts it."""
        alive_before = len(self.alive_nodes())

        def joined(log: Path) -> None:
            deadline = time.time() + 90
            while len(self.alive_nodes()) <= alive_before and self.nodes[name].poll() is None:
                if time.time() > deadline:
                    pytest.fail(f"node {name} did not join in 90 s: {log.read_text()}")
                time.sleep(1)

        self._start(name, [f"--address=127.0.0.1:{self.gcs_port}"], (), num_cpus, {}, joined)

    def kill_node(self, name: str) -> None:
        """What a lost machine does: every process of the node dies at once, nothing cleans up.
        Returns once the head counts the node dead (``add_node`` counts the nodes that joined)."""
        alive_before = len(self.alive_nodes())
        processes = _processes_of(self.nodes[name].pid)
        os.killpg(self.nodes[name].pid, signal.SIGKILL)
        _kill(processes)
        self.nodes.pop(name).wait(timeout=30)
        deadline = time.time() + 90
        while len(self.alive_nodes()) >= alive_before:
            if time.time() > deadline:
                pytest.fail(f"the head still counts node {name} alive 90 s after it was killed")
            time.sleep(1)

    def stop_node(self, name: str) -> None:
        """Stop this node by its own process (SIGTERM to its `ray start --block`, which stops the
        processes it started), then kill whatever of them outlives that."""
        node = self.nodes.pop(name)
        processes = _processes_of(node.pid)
        node.terminate()  # `ray start --block` stops the processes it started
        try:
            node.wait(timeout=60)
        finally:
            try:
                os.killpg(node.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _kill(processes)

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """A `ray` CLI command against this cluster's dashboard (jobs, state API); the address
        goes before a job's ``--`` entrypoint, which takes the rest."""
        split = args.index("--") if "--" in args else len(args)
        command = [RAY, *args[:split], "--address", self.dashboard, *args[split:]]
        return subprocess.run(command, env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def _listed(self, kind: str) -> list[dict]:
        """`ray list KIND` of the alive ones; none while the state API is not up yet (it then
        prints a sentence, as it does for an empty list)."""
        listed = self.ray("list", kind, "--format", "json", "--filter", "state=ALIVE")
        return json.loads(listed.stdout) if listed.stdout.lstrip().startswith("[") else []

    def alive_nodes(self) -> list[dict]:
        return self._listed("nodes")

    def submit(self, submission_id: str, entrypoint: list[str], *, wait: bool = True,
               timeout: float = 400) -> subprocess.CompletedProcess:
        """`ray job submit` of ``entrypoint`` with this checkout as the working dir. The job's
        interpreter is named by its absolute path (the project's, whatever the PATH of the node
        finds first as `python`); the driver and every worker it starts then run it."""
        command = ["job", "submit", "--submission-id", submission_id, "--working-dir", str(REPO),
                   *([] if wait else ["--no-wait"]), "--", sys.executable, *entrypoint]
        for _ in range(10):  # the dashboard answers before its job agent is ready
            submitted = self.ray(*command, timeout=timeout)
            if "No available agent" not in submitted.stdout + submitted.stderr:
                return submitted
            time.sleep(2)
        return submitted

    def job_status(self, submission_id: str) -> str:
        """PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED (`ray job status` says it in words)."""
        said = (self.ray("job", "status", submission_id).stdout).lower()
        return next((word.upper() for word in ("succeeded", "failed", "stopped", "running",
                                                "pending") if word in said), f"unknown: {said}")

    def wait_for_job(self, submission_id: str, timeout: float = 300) -> str:
        """Follow the job's log until it ends; return its log."""
        return self.ray("job", "logs", "--follow", submission_id, timeout=timeout).stdout


def _processes_of(pid: int) -> list[psutil.Process]:
    """A node's `ray start` process and every process under it, whatever their process group:
    a Ray worker (e.g. Ray Train's controller) takes a group of its own, so a kill of the node's
    group alone left it running after the test."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _ports_not_listened_by(node: subprocess.Popen, ports: set[int], seconds: float = 60
                           ) -> set[int]:
    """Those of ``ports`` that no process of ``node`` listens on within ``seconds`` (its agents
    bind theirs a few seconds after the node counts as joined); all of them if it exited."""
    deadline = time.time() + seconds
    while node.poll() is None:
        listened = set()
        for process in _processes_of(node.pid):
            try:
                listened |= {c.laddr.port for c in process.net_connections("tcp")
                             if c.status == psutil.CONN_LISTEN}
            except psutil.Error:  # gone meanwhile
                pass
        if ports <= listened or time.time() > deadline:
            return ports - listened
        time.sleep(1)
    return ports


def _kill(processes: list[psutil.Process]) -> None:
    """SIGKILL each still running (psutil checks that a pid was not reused by another process)."""
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass

"""`ray job submit` against a `ray start --head` on loopback, with Ray 2.60 token auth, as the
README writes it: the job names the project's interpreter and trains on two workers."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from allcore.artifact import load_artifact
from allcore.labels import get_label_set
from allcore.synthetic import write_archive

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(url_port: int, proc: subprocess.Popen, log: Path, seconds: float = 90) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited early:\n{log.read_text()}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", url_port)) == 0:
                return
        time.sleep(1)
    raise TimeoutError("the Ray dashboard did not come up")


def test_train_job_through_ray_job_submit(tmp_path):
    archive = tmp_path / "archive"
    write_archive(archive, label_set=get_label_set("all4"), per_class=8, size=64, seed=5)
    gcs, dashboard = _free_port(), _free_port()
    # every port of its own: a second Ray on this machine (the test session's) holds the defaults
    own_ports = [f"--{flag}={_free_port()}" for flag in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
        "metrics-export-port", "ray-client-server-port", "node-manager-port", "object-manager-port")]
    # no virtualenv on PATH: the README's command names its interpreter (a bare `python` would be
    # whatever the head's PATH finds first)
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    head_log = tmp_path / "ray-head.log"
    ray_temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # AF_UNIX socket paths must stay short
    # --block keeps the head in this process tree: terminating it stops only this cluster
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2",
         "--include-dashboard=true", f"--temp-dir={ray_temp}", *own_ports],
        env=env, stdout=head_log.open("w"), stderr=subprocess.STDOUT)
    try:
        _wait_for(dashboard, head, head_log)
        out = tmp_path / "runs"
        command = [RAY, "job", "submit", "--address", f"http://127.0.0.1:{dashboard}",
                   "--working-dir", str(REPO), "--", sys.executable, "jobs/train.py", "--recipe", "demo",
                   "--workers", "2",
                   "--data", str(archive), "--output", str(out), "--name", "submitted",
                   "--epochs", "1", "--input-size", "32", "--set", "pretrained=false"]
        for _ in range(10):  # the dashboard answers before its job agent is ready
            submit = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
            if "No available agent" not in submit.stdout + submit.stderr:
                break
            time.sleep(2)
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        assert "succeeded" in submit.stdout
        _, card = load_artifact(str(out / "submitted" / "model"))
        assert card.classes == list(get_label_set("all4").classes)
    finally:
        head.terminate()
        head.wait(timeout=60)
        shutil.rmtree(ray_temp, ignore_errors=True)

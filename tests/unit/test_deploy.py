"""Deployment files, checked offline: no Docker engine, no cluster.

* ``docker-compose.yml`` with ``docker-compose config -q`` (Compose v2's
  ``docker compose`` or Debian's ``docker-compose`` 1.29; .ci/run installs the
  latter when neither is there), plus the properties the deployment relies on.
* ``deploy/k8s/**.yaml`` against the Kubernetes OpenAPI schemas, strictly (an
  unknown field is an error), with ``kubernetes-validate`` from PyPI: it bundles
  the JSON schemas of every Kubernetes release, so nothing is downloaded.
* The negative tests break a copy of each and expect the same checks to fail.
"""

from __future__ import annotations

import copy
import glob
import os
import re
import shutil
import subprocess
from dataclasses import fields
from pathlib import Path

import pytest

from streams.config.settings import Settings
from tests.support.paths import REPO as ROOT

yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (`make test` installs it "
                                          "with kubernetes-validate)")

COMPOSE_FILE = ROOT / "docker-compose.yml"
K8S_DIR = ROOT / "deploy" / "k8s"
#: Kubernetes releases the manifests must be valid for (oldest supported, recent).
K8S_VERSIONS = ("1.29.0", "1.33.0")

#: LIFTSTREAM_* variables the code reads: the Settings fields, plus the app's datadir.
KNOWN_ENV = {f"LIFTSTREAM_{f.name.upper()}" for f in fields(Settings) if f.name != "extra"} | {
    "LIFTSTREAM_DATADIR"}
#: What the operator sets for compose's LIFTSTREAM_API_TOKEN in these tests.
TEST_TOKEN = "test-token-0123456789abcdef"
#: Declared in the Secret as placeholders for a SASL cluster; not read yet.
PLACEHOLDER_ENV = {"LIFTSTREAM_KAFKA_SECURITY_PROTOCOL", "LIFTSTREAM_KAFKA_SASL_MECHANISM",
                   "LIFTSTREAM_KAFKA_SASL_USERNAME", "LIFTSTREAM_KAFKA_SASL_PASSWORD"}


# ---------------------------------------------------------------- docker compose

def _compose_cmd() -> list[str] | None:
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


@pytest.fixture(scope="module")
def compose():
    cmd = _compose_cmd()
    if cmd is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed; "
                    "`apt-get install docker-compose` (what .ci/run does) or install Compose v2")
    return cmd


def _compose_config(compose, path: Path, *args: str, quiet: bool = False,
                    token: str | None = TEST_TOKEN):
    """``compose config`` of ``path``; ``token``: the LIFTSTREAM_API_TOKEN the
    operator exports (None: unset)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("COMPOSE_", "DOCKER_", "KAFKA_", "LIFTSTREAM_"))}
    if token is not None:
        env["LIFTSTREAM_API_TOKEN"] = token
    cmd = compose + ["-f", str(path), "--project-directory", str(ROOT), *args, "config"]
    if quiet:
        cmd.append("-q")
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60, cwd=ROOT)


def test_compose_config_is_valid(compose):
    for profile in ([], ["--profile", "gpu"]):
        out = _compose_config(compose, COMPOSE_FILE, *profile, quiet=True)
        assert out.returncode == 0, f"config -q {profile}: {out.stderr}"


def test_compose_services(compose):
    out = _compose_config(compose, COMPOSE_FILE, "--profile", "gpu")
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    services = cfg["services"]
    assert {"kafka", "redis", "ingest", "sampler", "sampler-gpu"} <= set(services)

    kafka = services["kafka"]
    assert re.fullmatch(r"apache/kafka:4\.\d+\.\d+", kafka["image"]), kafka["image"]
    kenv = kafka["environment"]
    assert kenv["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, combined
    assert "kafka-broker-api-versions" in " ".join(kafka["healthcheck"]["test"])

    redis = services["redis"]
    assert redis["image"].startswith("redis:7")
    cmd = redis["command"]
    cmd = cmd if isinstance(cmd, list) else cmd.split()
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    assert cmd[cmd.index("--appendfsync") + 1] == "everysec"
    assert cmd[cmd.index("--maxmemory-policy") + 1] == "noeviction"
    assert cmd[cmd.index("--maxmemory") + 1]  # set: a full Redis stalls ingest, never evicts
    assert "redis-cli" in redis["healthcheck"]["test"]

    for name, role in (("ingest", "ingest"), ("sampler", "sampler"), ("sampler-gpu", "sampler")):
        svc = services[name]
        command = svc["command"] if isinstance(svc["command"], list) else svc["command"].split()
        assert command[:3] == ["worker", "--role", role], (name, command)
        assert "/healthz" in " ".join(svc["healthcheck"]["test"]), name
        assert set(svc["depends_on"]) == {"kafka", "redis"}
        env = svc["environment"]
        unknown = {k for k in env if k.startswith("LIFTSTREAM_")} - KNOWN_ENV
        assert not unknown, f"{name}: variables liftstream does not read: {unknown}"
        assert env["LIFTSTREAM_BOOTSTRAP_SERVERS"] == "kafka:9092"
        assert env["LIFTSTREAM_WEB_HOST"] == "0.0.0.0"
    # ingest is scaled with --scale: it must not pin a host port or a name.
    assert not services["ingest"].get("ports") and "container_name" not in services["ingest"]
    assert services["sampler"].get("ports"), "the sampler serves the HTTP API"

    gpu = services["sampler-gpu"]
    assert gpu["environment"]["LIFTSTREAM_DEVICE"] == "gpu"
    assert gpu["build"]["dockerfile"].endswith("Dockerfile.cuda")
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]

    # Only with --profile gpu (Compose 1.29's `config` lists profiled services anyway).
    assert gpu["profiles"] == ["gpu"]
    assert all(not services[s].get("profiles") for s in ("kafka", "redis", "ingest", "sampler"))


def test_compose_rejects_a_broken_file(compose, tmp_path):
    text = COMPOSE_FILE.read_text()
    broken = {
        "unknown option": text.replace("    stop_grace_period: 30s\n",
                                       "    stop_grace_period: 30s\n    replicaz: 2\n", 1),
        "wrong type": text.replace("      retries: 10\n", "      retries: [ten]\n", 1),
        "bad yaml": text.replace("services:\n", "services:\n  - [\n", 1),
    }
    for what, bad in broken.items():
        assert bad != text, what
        path = tmp_path / f"{what.replace(' ', '-')}.yml"
        path.write_text(bad)
        out = _compose_config(compose, path, quiet=True)
        assert out.returncode != 0, f"{what}: a broken compose file passed `config -q`"


# ------------------------------------------------------------------- Dockerfiles

def test_dockerfiles():
    cpu = (ROOT / "deploy" / "Dockerfile").read_text()
    cuda = (ROOT / "deploy" / "Dockerfile.cuda").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", cpu, re.M)
    assert re.search(r"^FROM nvidia/cuda:12\.[\d.]+-(cudnn-)?runtime-", cuda, re.M)
    assert "pip install '.[gpu]'" in cuda
    for text in (cpu, cuda):
        assert re.search(r"^USER \d+", text, re.M), "run as a non-root user"
        assert 'ENTRYPOINT ["liftstream"]' in text
        for d in ("schemas/", "kernels/", "streams/"):
            assert f"COPY {d} {d}" in text


# ---------------------------------------------------------------------- k8s

try:
    import kubernetes_validate as kv
except ImportError:  # the compose and Dockerfile tests above still run
    kv = None


@pytest.fixture(autouse=True)
def _needs_kubernetes_validate(request):
    if request.node.name.startswith("test_k8s") and kv is None:
        pytest.skip("kubernetes-validate is not installed (`make test` installs it; "
                    "or `pip install kubernetes-validate`)")


def k8s_documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(glob.glob(str(K8S_DIR / "**" / "*.yaml"), recursive=True)):
        rel = os.path.relpath(path, ROOT)
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if doc is not None:
                    docs.append((rel, doc))
    return docs


class NotAManifest(ValueError):
    pass


def validate_manifest(doc: dict) -> None:
    """Raise if ``doc`` is not a valid object for every release in K8S_VERSIONS.

    Strict: additional properties are errors, so a misspelled field fails
    instead of being silently dropped by the API server.
    """
    if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
        raise NotAManifest("not a Kubernetes object (kind or apiVersion missing)")
    for version in K8S_VERSIONS:
        kv.validate(doc, version, strict=True)


DOCS = k8s_documents()


@pytest.mark.parametrize("path,doc", DOCS, ids=[f"{p}:{d['kind']}/{d['metadata']['name']}"
                                                for p, d in DOCS])
def test_k8s_manifest_matches_schema(path, doc):
    validate_manifest(doc)


def _by_kind(kind: str) -> list[tuple[str, dict]]:
    return [(p, d) for p, d in DOCS if d["kind"] == kind]


def test_k8s_has_what_a_deployment_needs():
    kinds = {d["kind"] for _, d in DOCS}
    assert {"Deployment", "Service", "ConfigMap", "Secret", "PodDisruptionBudget"} <= kinds
    deployments = {(p, d["metadata"]["name"]): d for p, d in _by_kind("Deployment")}
    names = {name for _, name in deployments}
    assert names == {"liftstream-ingest", "liftstream-sampler"}

    for (path, name), dep in deployments.items():
        spec = dep["spec"]
        labels = spec["template"]["metadata"]["labels"]
        assert spec["selector"]["matchLabels"].items() <= labels.items(), path
        (container,) = spec["template"]["spec"]["containers"]
        role = name.removeprefix("liftstream-")
        assert container["args"][:3] == ["worker", "--role", role], path
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz", path
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz", path
        refs = {next(iter(e.values()))["name"] for e in container["envFrom"]}
        assert refs == {"liftstream-config", "liftstream-secrets"}, path
        gpu_limit = container["resources"].get("limits", {}).get("nvidia.com/gpu")
        node_selector = spec["template"]["spec"].get("nodeSelector", {})
        if path.startswith("deploy/k8s/gpu/"):
            assert gpu_limit == 1 and node_selector, "GPU sampler: GPU limit and node selector"
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert env["LIFTSTREAM_DEVICE"] == "gpu"
        else:
            assert gpu_limit is None, path

    # Each Service and PodDisruptionBudget selects the pods of some Deployment.
    pod_labels = [d["spec"]["template"]["metadata"]["labels"] for d in deployments.values()]
    for path, obj in _by_kind("Service") + _by_kind("PodDisruptionBudget"):
        sel = obj["spec"]["selector"]
        sel = sel.get("matchLabels", sel)
        assert any(sel.items() <= labels.items() for labels in pod_labels), (path, sel)

    (_, cm), = _by_kind("ConfigMap")
    unknown = set(cm["data"]) - KNOWN_ENV
    assert not unknown, f"ConfigMap keys liftstream does not read: {unknown}"
    (_, secret), = _by_kind("Secret")
    assert "LIFTSTREAM_REDIS_URL" in secret["stringData"]
    assert set(secret["stringData"]) - KNOWN_ENV <= PLACEHOLDER_ENV


def _ingest() -> dict:
    return copy.deepcopy(next(d for p, d in DOCS if p.endswith("ingest.yaml")))


def _container(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("breakage", [
    "misspelled field", "wrong type", "required field missing", "unknown kind", "no kind"])
def test_k8s_validation_rejects_broken_manifest(breakage):
    doc = _ingest()
    validate_manifest(doc)  # the unbroken one passes
    if breakage == "misspelled field":
        _container(doc)["livenesProbe"] = _container(doc).pop("livenessProbe")
    elif breakage == "wrong type":
        doc["spec"]["replicas"] = "three"
    elif breakage == "required field missing":
        del doc["spec"]["template"]["spec"]["containers"]
    elif breakage == "unknown kind":
        doc["kind"] = "Deploymnet"
    elif breakage == "no kind":
        del doc["kind"]
    with pytest.raises((kv.ValidationError, kv.SchemaNotFoundError, NotAManifest)):
        validate_manifest(doc)


def test_k8s_validation_rejects_broken_file(tmp_path):
    """The whole path, from a YAML file on disk: a typo in a probe's port type."""
    text = (K8S_DIR / "ingest.yaml").read_text()
    bad = text.replace("              port: http\n", "              port: [http]\n", 1)
    assert bad != text
    (tmp_path / "ingest.yaml").write_text(bad)
    docs = [d for d in yaml.safe_load_all((tmp_path / "ingest.yaml").read_text()) if d]
    with pytest.raises(kv.ValidationError):
        for doc in docs:
            validate_manifest(doc)


# ------------------------------------------------- issue 24, defect 9: the API token

def _dockerfile_env(text: str) -> dict[str, str]:
    """The ``ENV`` settings of a Dockerfile (``KEY=value`` pairs, continued lines)."""
    out: dict[str, str] = {}
    for m in re.finditer(r"^ENV\s+((?:.*\\\n)*.*)$", text, re.M):
        for pair in re.findall(r"([A-Z_][A-Z0-9_]*)=(\S+)", m.group(1)):
            out[pair[0]] = pair[1]
    return out


def _settings(env: dict[str, str]) -> Settings:
    return Settings.from_env({k: v for k, v in env.items() if k in KNOWN_ENV})


def test_defect9_deploy_files_take_the_api_token_from_the_operator():
    """Every deployment listens beyond loopback, so each must get a strong
    token the operator sets, and ship none: the worker refuses to start
    without one (``check_exposure``), and a shipped placeholder would either be
    refused or, worse, accepted by everyone who read the repository."""
    from streams.service.web import UnsafeWebSettings, check_exposure

    strong = {"LIFTSTREAM_API_TOKEN": TEST_TOKEN}
    for name in ("Dockerfile", "Dockerfile.cuda"):
        text = (ROOT / "deploy" / name).read_text()
        env = _dockerfile_env(text)
        assert env["LIFTSTREAM_WEB_HOST"] == "0.0.0.0", name
        assert "LIFTSTREAM_API_TOKEN" not in env, f"{name}: a token baked into the image"
        assert "LIFTSTREAM_API_TOKEN" in text, f"{name}: say how to pass the token"
        with pytest.raises(UnsafeWebSettings, match="LIFTSTREAM_API_TOKEN"):
            check_exposure(_settings(env))
        check_exposure(_settings({**env, **strong}))

    # compose: required from the operator's environment, no default
    compose_env = yaml.safe_load(COMPOSE_FILE.read_text())["x-liftstream-env"]
    assert re.fullmatch(r"\$\{LIFTSTREAM_API_TOKEN:\?[^}]+\}",
                        compose_env["LIFTSTREAM_API_TOKEN"]), compose_env
    with pytest.raises(UnsafeWebSettings):
        check_exposure(_settings({**compose_env, "LIFTSTREAM_API_TOKEN": ""}))

    # k8s: from a Secret the operator creates (secretKeyRef, not optional);
    # the shipped Secret holds no token
    (_, cm), = _by_kind("ConfigMap")
    with pytest.raises(UnsafeWebSettings):
        check_exposure(_settings(cm["data"]))
    check_exposure(_settings({**cm["data"], **strong}))
    for _, secret in _by_kind("Secret"):
        assert "LIFTSTREAM_API_TOKEN" not in secret.get("stringData", {}), secret
        assert "LIFTSTREAM_API_TOKEN" not in secret.get("data", {}), secret
        assert secret["metadata"]["name"] != "liftstream-api-token", "shipped: not secret"
    deployments = _by_kind("Deployment")
    assert deployments
    for path, dep in deployments:
        (container,) = dep["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e for e in container.get("env", [])}
        ref = env.get("LIFTSTREAM_API_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef")
        assert ref and ref["name"] == "liftstream-api-token" and ref["key"] == "token", path
        assert not ref.get("optional"), f"{path}: the pod must wait for the token"


def test_defect9_compose_refuses_to_run_without_the_token(compose):
    for token in (None, ""):
        out = _compose_config(compose, COMPOSE_FILE, quiet=True, token=token)
        assert out.returncode != 0, f"token {token!r}: compose accepted it"
        assert "LIFTSTREAM_API_TOKEN" in out.stderr, out.stderr
    out = _compose_config(compose, COMPOSE_FILE)
    assert out.returncode == 0, out.stderr
    env = yaml.safe_load(out.stdout)["services"]["sampler"]["environment"]
    assert env["LIFTSTREAM_API_TOKEN"] == TEST_TOKEN

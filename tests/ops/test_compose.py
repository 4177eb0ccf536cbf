"""Deployment files: docker-compose.yml, .env.example, the Dockerfiles and docs/settings.md.

docker-compose.yml is interpolated with the values of .env.example (as `docker compose`
would with that file as .env), then validated against the Compose Specification schema
vendored in tests/data (see tests/data/README-compose-spec.md). The worker checks run on
the file as shipped (one GPU) and with the override ops/compose-gpus.py prints for 2 and 4
GPUs. Where a working `docker compose` is installed, its own `config` command is checked
too; it needs no daemon.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from vision_queue.settings import Settings, settings_table

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
SCHEMA_FILE = ROOT / "tests" / "data" / "compose-spec.json"
WORKER_DOCKERFILE = ROOT / "ops" / "worker.Dockerfile"
LIGHT_DOCKERFILE = ROOT / "ops" / "light.Dockerfile"
COMPOSE_GPUS = ROOT / "ops" / "compose-gpus.py"
PROXY_DIR = ROOT / "ops" / "flower-proxy"

LOOPBACK = {"127.0.0.1", "::1", "[::1]", "localhost"}
SECRETS = ("REDIS_PASSWORD", "FLOWER_USER", "FLOWER_PASSWORD")
# What an operator fills in; .env.example ships them empty.
TEST_SECRETS = {
    "REDIS_PASSWORD": "0123456789abcdef",
    "FLOWER_USER": "ops",
    "FLOWER_PASSWORD": "flower-test-password",
}
SETTING_DEFAULTS = {f.metadata["env"]: f.default for f in fields(Settings)}

# --- Compose interpolation, the subset this project uses -------------------------------
# $$ (a literal $), $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}.
_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)


class InterpolationError(ValueError):
    """A required variable is unset or empty, as `docker compose` would report it."""


def interpolate(text: str, env: Mapping[str, str]) -> str:
    def substitute(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["named"]
        op, arg = match["op"], match["arg"]
        value = env.get(name)
        unset = value is None or (value == "" and op is not None and op.startswith(":"))
        if op is not None and op.endswith("?") and unset:
            raise InterpolationError(f"required variable {name} is missing a value: {arg}")
        if op is not None and op.endswith("-") and unset:
            return arg
        return value or ""

    return _VARIABLE.sub(substitute, text)


def interpolate_tree(node: Any, env: Mapping[str, str]) -> Any:
    """Compose interpolates values, never keys, after parsing the YAML."""
    if isinstance(node, dict):
        return {key: interpolate_tree(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate_tree(item, env) for item in node]
    if isinstance(node, str):
        return interpolate(node, env)
    return node


def referenced_variables(text: str) -> set[str]:
    return {
        m["braced"] or m["named"]
        for m in _VARIABLE.finditer(text)
        if not m["escaped"]
    }


def read_env_file(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        assert sep, f"{path.name}: not NAME=value: {line!r}"
        env[name.strip()] = value.strip()
    return env


def load_compose(env: Mapping[str, str]) -> dict[str, Any]:
    return interpolate_tree(yaml.safe_load(COMPOSE_FILE.read_text()), env)


def compose_gpus(*args: str) -> subprocess.CompletedProcess[str]:
    """`python3 ops/compose-gpus.py ARGS`, as the README tells operators to run it."""
    return subprocess.run(
        [sys.executable, str(COMPOSE_GPUS), *args],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )


def generated_override(gpus: int) -> dict[str, Any]:
    done = compose_gpus(str(gpus))
    assert done.returncode == 0, done.stderr
    override: dict[str, Any] = yaml.safe_load(done.stdout)
    return override


def merge_new_services(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`docker compose -f base -f override` for an override that only adds services: the
    one case where Compose's merge rules (lists appended, maps merged) play no part."""
    clash = set(base["services"]) & set(override["services"])
    assert not clash, f"the override redefines {sorted(clash)}"
    assert set(override) == {"services"}, set(override)
    return {**base, "services": {**base["services"], **override["services"]}}


def load_compose_with_gpus(env: Mapping[str, str], gpus: int) -> dict[str, Any]:
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    return interpolate_tree(merge_new_services(raw, generated_override(gpus)), env)


def compose_duration_s(value: str) -> float:
    """Compose durations: `90s`, `11m`, `1m30s`, `1h`, `500ms`."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", value)
    assert parts, f"not a duration: {value!r}"
    assert "".join(n + u for n, u in parts) == value, f"not a duration: {value!r}"
    return sum(float(n) * units[u] for n, u in parts)


def as_dict(environment: Any) -> dict[str, str]:
    if isinstance(environment, dict):
        return {k: "" if v is None else str(v) for k, v in environment.items()}
    return dict(item.partition("=")[::2] for item in environment or [])


def flag_values(command: list[str]) -> dict[str, str]:
    """`--name value` pairs of a redis-server command line."""
    values: dict[str, str] = {}
    for flag, value in itertools.pairwise(command):
        if flag.startswith("--"):
            values[flag[2:]] = value
    return values


def published_ports(service: dict[str, Any]) -> list[tuple[str | None, str]]:
    """(host ip or None, container port) for each published port, short or long syntax."""
    out: list[tuple[str | None, str]] = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            out.append((port.get("host_ip"), str(port["target"])))
            continue
        spec = str(port).split("/")[0]
        host_ip = None
        if spec.startswith("["):  # [::1]:8080:80
            host_ip, _, spec = spec[1:].partition("]:")
        parts = spec.split(":")
        if len(parts) == 3:
            host_ip = parts[0]
        out.append((host_ip, parts[-1]))
    return out


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    """.env.example with the secrets filled in, as an operator's .env would be."""
    return {**read_env_file(ENV_EXAMPLE), **TEST_SECRETS}


@pytest.fixture(scope="module")
def compose(env: dict[str, str]) -> dict[str, Any]:
    return load_compose(env)


@pytest.fixture(scope="module", params=[1, 2, 4], ids=lambda n: f"{n}-gpu")
def gpu_count(request: pytest.FixtureRequest) -> int:
    count: int = request.param
    return count


@pytest.fixture(scope="module")
def compose_n(env: dict[str, str], gpu_count: int) -> dict[str, Any]:
    """The stack for a host with `gpu_count` GPUs: shipped as is for 1, else with the
    generated compose.gpus.yml."""
    return load_compose(env) if gpu_count == 1 else load_compose_with_gpus(env, gpu_count)


@pytest.fixture(scope="module")
def workers(compose_n: dict[str, Any], gpu_count: int) -> dict[str, dict[str, Any]]:
    found = {name: s for name, s in compose_n["services"].items() if name.startswith("worker-")}
    assert sorted(found) == [f"worker-{i}" for i in range(gpu_count)], "one worker per GPU"
    return found


# --- The compose file as a whole ---------------------------------------------------------


def test_compose_file_is_valid_against_the_compose_specification(compose: dict[str, Any]):
    schema = json.loads(SCHEMA_FILE.read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors
    )


def test_env_example_defines_every_variable_the_compose_file_reads(env: dict[str, str]):
    missing = referenced_variables(COMPOSE_FILE.read_text()) - env.keys()
    assert not missing, f".env.example lacks {sorted(missing)}"


def test_env_example_ships_no_secrets():
    example = read_env_file(ENV_EXAMPLE)
    # Copied unedited, it makes compose refuse to start rather than run with a known password.
    assert all(example[name] == "" for name in SECRETS)
    with pytest.raises(InterpolationError, match="REDIS_PASSWORD"):
        load_compose(example)


@pytest.mark.parametrize("secret", SECRETS)
def test_compose_refuses_to_start_without_each_secret(env: dict[str, str], secret: str):
    # Given .env without the secret (unset, or set to nothing)
    for without in ({k: v for k, v in env.items() if k != secret}, {**env, secret: ""}):
        # Then interpolation fails, naming the variable
        with pytest.raises(InterpolationError, match=secret):
            load_compose(without)


def test_compose_defaults_agree_with_the_settings_defaults():
    text = COMPOSE_FILE.read_text()
    for match in _VARIABLE.finditer(text):
        name = match["braced"]
        if name in SETTING_DEFAULTS and match["op"] == ":-":
            assert match["arg"] == str(SETTING_DEFAULTS[name]), name


# --- Workers -----------------------------------------------------------------------------


def test_the_stack_for_n_gpus_is_valid_against_the_compose_specification(
    compose_n: dict[str, Any],
):
    schema = json.loads(SCHEMA_FILE.read_text())
    errors = list(jsonschema.Draft7Validator(schema).iter_errors(compose_n))
    assert not errors, [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


def test_a_one_gpu_host_runs_as_shipped(compose: dict[str, Any]):
    # A reservation of a GPU the host lacks fails at container start: ship GPU 0 only.
    workers = [name for name in compose["services"] if name.startswith("worker-")]
    assert workers == ["worker-0"]
    (device,) = compose["services"]["worker-0"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["device_ids"] == ["0"]


@pytest.mark.parametrize("gpus", [2, 4])
def test_generated_workers_are_worker_0_with_another_name_and_gpu(gpus: int):
    worker_0 = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["worker-0"]
    for i, (name, service) in enumerate(generated_override(gpus)["services"].items(), 1):
        assert name == f"worker-{i}"
        assert service["environment"]["VQ_WORKER_NAME"] == f"gpu{i}@${{VQ_HOST_LABEL:-gpu-host}}"
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["device_ids"] == [str(i)]
        # Everything else is worker-0's: settings, image, health check, grace period.
        same = json.loads(json.dumps(service))
        same["environment"]["VQ_WORKER_NAME"] = worker_0["environment"]["VQ_WORKER_NAME"]
        same["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] = ["0"]
        # and its metrics on a host port of its own
        assert service["ports"] == [
            port.replace(":9100:9100", f":{9100 + i}:9100") for port in worker_0["ports"]
        ]
        same["ports"] = worker_0["ports"]
        assert same == worker_0, name


def test_the_generator_is_deterministic_and_says_how_to_use_its_output():
    first, second = compose_gpus("4"), compose_gpus("4")
    assert first.stdout == second.stdout
    assert "docker compose -f docker-compose.yml -f compose.gpus.yml up -d" in first.stdout
    assert generated_override(1) == {"services": {}}


@pytest.mark.parametrize("bad", ["0", "-2", "two", ""])
def test_the_generator_refuses_a_bad_gpu_count(bad: str):
    done = compose_gpus(bad)
    assert done.returncode == 2, done
    assert done.stdout == "" and "gpus" in done.stderr


def test_each_worker_reserves_its_own_gpu(workers: dict[str, dict[str, Any]]):
    device_ids: list[str] = []
    for name, service in workers.items():
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1, name
        (device,) = devices
        assert device["driver"] == "nvidia", name
        assert "gpu" in device["capabilities"], name
        assert len(device["device_ids"]) == 1, f"{name}: one GPU per worker"
        device_ids += device["device_ids"]
        # Inside the container the one reserved GPU is always cuda:0.
        assert as_dict(service["environment"])["VQ_DEVICE"] == "cuda:0", name
    assert len(set(device_ids)) == len(device_ids), f"GPU reserved twice: {device_ids}"
    assert sorted(device_ids, key=int) == [str(i) for i in range(len(workers))], device_ids


def test_workers_have_distinct_node_names(workers: dict[str, dict[str, Any]]):
    names = [as_dict(s["environment"])["VQ_WORKER_NAME"] for s in workers.values()]
    assert all(names) and len(set(names)) == len(names), names


def test_worker_environment_is_valid_settings(workers: dict[str, dict[str, Any]]):
    for name, service in workers.items():
        environment = as_dict(service["environment"])
        settings = Settings.from_env(environment)  # raises SettingsError naming the fault
        assert environment["REDIS_URL"].startswith("redis://:"), f"{name}: password in URL"
        assert "@redis:6379/" in environment["REDIS_URL"], name
        assert settings.metrics_port > 0, f"{name}: metrics on"
        assert str(settings.metrics_port) in [str(p) for p in service.get("expose", [])], name
        assert environment["HF_HOME"] == "/hf-cache", name
        assert any(v.endswith(":/hf-cache") for v in service["volumes"]), name


@pytest.mark.parametrize("only_secrets", [False, True], ids=["env-example", "defaults"])
def test_a_stopping_worker_may_finish_its_longest_task(env: dict[str, str], only_secrets: bool):
    # Given .env.example as it is, or only its secrets (every other value from the defaults)
    if only_secrets:
        env = {k: env[k] for k in SECRETS}
    services = load_compose(env)["services"]
    limit_s = int(env.get("VQ_TASK_TIME_LIMIT_S", SETTING_DEFAULTS["VQ_TASK_TIME_LIMIT_S"]))
    for name in (n for n in services if n.startswith("worker-")):
        service = services[name]
        assert service["stop_signal"] == "SIGTERM", name
        # Then Docker's SIGKILL comes only after the longest task could have finished
        assert compose_duration_s(service["stop_grace_period"]) > limit_s, name
        assert as_dict(service["environment"])["VQ_TASK_TIME_LIMIT_S"] == str(limit_s), name


def test_workers_report_readiness_and_wait_for_a_healthy_redis(
    workers: dict[str, dict[str, Any]],
):
    for name, service in workers.items():
        assert service["healthcheck"]["test"] == ["CMD", "worker", "health", "--ready"], name
        assert service["depends_on"]["redis"]["condition"] == "service_healthy", name


# --- Redis -------------------------------------------------------------------------------


def test_redis_is_durable_password_protected_and_never_evicts(
    compose: dict[str, Any], env: dict[str, str]
):
    redis = compose["services"]["redis"]
    assert redis["image"].split(":")[0] == "redis"
    assert redis["image"].split(":")[1].startswith("7")
    flags = flag_values(redis["command"])
    assert flags["appendonly"] == "yes"
    assert flags["appendfsync"] == "everysec"
    assert flags["requirepass"] == env["REDIS_PASSWORD"]
    assert flags["maxmemory-policy"] == "noeviction"
    raw = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["redis"]["command"]
    assert "${REDIS_PASSWORD:?" in " ".join(raw), "no default password"


def test_redis_health_check_authenticates_and_checks_the_reply(compose: dict[str, Any]):
    redis = compose["services"]["redis"]
    test = " ".join(redis["healthcheck"]["test"])
    assert "redis-cli" in test
    authenticated = " -a " in test or "REDISCLI_AUTH" in as_dict(redis.get("environment"))
    assert authenticated
    # redis-cli exits 0 on a NOAUTH error reply: only PONG means healthy.
    assert "PONG" in test


def test_redis_data_lives_in_a_named_volume(compose: dict[str, Any]):
    volumes = compose["services"]["redis"]["volumes"]
    named = [v.split(":")[0] for v in volumes if v.split(":")[1] == "/data"]
    assert named and named[0] in compose["volumes"]


def test_redis_is_not_published_beyond_loopback(compose: dict[str, Any]):
    for name, service in compose["services"].items():
        for host_ip, target in published_ports(service):
            if name == "redis" or target == "6379":
                assert host_ip in LOOPBACK, f"{name} publishes Redis on {host_ip or 'all'}"


# --- Flower ------------------------------------------------------------------------------


def test_flower_requires_basic_auth_and_keeps_its_state(
    compose: dict[str, Any], env: dict[str, str]
):
    flower = compose["services"]["flower"]
    command = flower["command"]
    assert f"--basic-auth={env['FLOWER_USER']}:{env['FLOWER_PASSWORD']}" in command
    assert "--persistent=True" in command
    db = next(arg.partition("=")[2] for arg in command if arg.startswith("--db="))
    mounts = {v.split(":")[1]: v.split(":")[0] for v in flower["volumes"]}
    mount = next(target for target in mounts if db.startswith(target + "/"))
    assert mounts[mount] in compose["volumes"], "state on a named volume"
    assert "producer.flower_app:app" in command


def test_flower_is_reached_through_its_proxy_on_loopback_only(compose: dict[str, Any]):
    # Flower itself is not published; the proxy is, on loopback.
    assert published_ports(compose["services"]["flower"]) == []
    proxy = compose["services"]["flower-proxy"]
    ports = published_ports(proxy)
    assert ports and all(host_ip in LOOPBACK for host_ip, _ in ports)
    # The dashboard, and /metrics on its own listener for Prometheus (published on
    # VQ_METRICS_BIND, loopback unless the operator names a private address).
    assert {target for _, target in ports} == {
        proxy["environment"]["FLOWER_PROXY_LISTEN"], proxy["environment"]["FLOWER_METRICS_LISTEN"]
    }
    assert proxy["environment"]["FLOWER_UPSTREAM"] == "flower:5555"
    assert proxy["depends_on"]["flower"]["condition"] == "service_healthy"
    assert proxy["environment"]["FLOWER_METRICS_LISTEN"] in [str(p) for p in proxy["expose"]]


def test_the_proxy_lets_dashboard_users_read_and_revoke_only_by_default(
    compose: dict[str, Any], env: dict[str, str]
):
    assert env["FLOWER_ALLOW_CONTROL"] == "0"
    assert compose["services"]["flower-proxy"]["environment"]["FLOWER_ALLOW_CONTROL"] == "0"
    without = {k: v for k, v in env.items() if k != "FLOWER_ALLOW_CONTROL"}
    assert load_compose(without)["services"]["flower-proxy"]["environment"][
        "FLOWER_ALLOW_CONTROL"
    ] == "0"


def test_the_proxy_image_carries_the_tested_template():
    # tests/integration/test_flower.py runs this very template in a real nginx.
    instructions = dockerfile_instructions(PROXY_DIR / "Dockerfile")
    stage = final_stage(instructions)
    assert default_base(instructions, stage[0][1]).startswith("nginxinc/nginx-unprivileged:")
    copies = [args for keyword, args in stage if keyword == "COPY"]
    assert "default.conf.template /etc/nginx/templates/default.conf.template" in copies
    template = (PROXY_DIR / "default.conf.template").read_text()
    needed = set(re.findall(r"\$\{([A-Z_]+)\}", template))
    env_line = next(args for keyword, args in stage if keyword == "ENV")
    assert needed == set(re.findall(r"([A-Z_]+)=", env_line)), "a default for each variable"


# --- docker compose itself, where installed ------------------------------------------------


def _docker_compose() -> list[str] | None:
    docker = shutil.which("docker")
    if docker is None:
        return None
    try:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return [docker, "compose"] if probe.returncode == 0 else None


def _run_compose_config(env_file: Path) -> subprocess.CompletedProcess[str]:
    command = _docker_compose()
    if command is None:
        pytest.skip("no working `docker compose` here")
    # Only .env decides: drop variables the caller's shell may have exported.
    referenced = referenced_variables(COMPOSE_FILE.read_text())
    clean_env = {
        k: v for k, v in os.environ.items() if k not in referenced and not k.startswith("COMPOSE_")
    }
    return subprocess.run(
        [*command, "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE),
         "--env-file", str(env_file), "config", "--format", "json"],
        capture_output=True, text=True, timeout=60, env=clean_env,
    )


def _env_file(path: Path, env: Mapping[str, str]) -> Path:
    path.write_text("".join(f"{name}={value}\n" for name, value in env.items()))
    return path


def test_docker_compose_config_accepts_the_file(
    compose: dict[str, Any], env: dict[str, str], tmp_path: Path
):
    result = _run_compose_config(_env_file(tmp_path / ".env", env))
    assert result.returncode == 0, result.stderr
    resolved = json.loads(result.stdout)
    # Same reading as the interpolation above.
    assert resolved["services"]["redis"]["command"] == compose["services"]["redis"]["command"]
    assert set(resolved["services"]) == set(compose["services"])


def test_docker_compose_config_fails_without_the_redis_password(
    env: dict[str, str], tmp_path: Path
):
    without = {k: v for k, v in env.items() if k != "REDIS_PASSWORD"}
    result = _run_compose_config(_env_file(tmp_path / ".env", without))
    assert result.returncode != 0
    assert "REDIS_PASSWORD" in result.stderr


# --- Settings documentation ---------------------------------------------------------------


@pytest.mark.parametrize("doc", ["docs/settings.md", "ops/README.md"])
def test_settings_docs_hold_the_settings_table_verbatim(doc: str):
    # Regenerate with: python -c "from vision_queue.settings import settings_table;
    # print(settings_table(), end='')"
    assert settings_table() in (ROOT / doc).read_text()


# --- Dockerfiles --------------------------------------------------------------------------


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    return instructions


def first_from(instructions: list[tuple[str, str]]) -> int:
    return next(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")


def default_base(instructions: list[tuple[str, str]], image: str) -> str:
    """A FROM image with the global ARG defaults substituted (no --build-arg given)."""
    defaults: dict[str, str] = {}
    for keyword, args in instructions[: first_from(instructions)]:
        if keyword == "ARG" and "=" in args:
            name, _, value = args.partition("=")
            defaults[name] = interpolate(value, defaults)
    return interpolate(image.split()[0], defaults)


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


@pytest.mark.parametrize("path", [WORKER_DOCKERFILE, LIGHT_DOCKERFILE], ids=lambda p: p.name)
def test_images_run_as_a_non_root_user(path: Path):
    users = [args for keyword, args in final_stage(dockerfile_instructions(path))
             if keyword == "USER"]
    assert users, f"{path.name}: no USER in the final stage"
    assert users[-1].split(":")[0] not in {"root", "0"}


def test_worker_image_checks_liveness_and_runs_the_worker():
    stage = final_stage(dockerfile_instructions(WORKER_DOCKERFILE))
    by_keyword = {keyword: args for keyword, args in stage}
    assert "worker health --live" in " ".join(json.loads(
        by_keyword["HEALTHCHECK"].partition("CMD")[2].strip()
    ))
    assert json.loads(by_keyword["ENTRYPOINT"]) == ["worker"]
    assert json.loads(by_keyword["CMD"]) == ["run"]
    assert any(kw == "RUN" and "[${extras}]" in args and "extras=worker" in args
               for kw, args in stage)


def test_worker_image_takes_flash_attn_as_an_optional_build_argument():
    instructions = dockerfile_instructions(WORKER_DOCKERFILE)
    args = [a for keyword, a in instructions if keyword == "ARG"]
    assert "WITH_FLASH_ATTN=0" in args, "declared, off by default"
    assert any(kw == "FROM" and "${WITH_FLASH_ATTN}" in a for kw, a in instructions)


def test_light_image_is_slim_python():
    instructions = dockerfile_instructions(LIGHT_DOCKERFILE)
    stage = final_stage(instructions)
    assert default_base(instructions, stage[0][1]) == "python:3.12-slim"
    assert "ARG PYTHON_VERSION=3.12" in LIGHT_DOCKERFILE.read_text()


def test_worker_image_is_the_cuda_base_by_default():
    instructions = dockerfile_instructions(WORKER_DOCKERFILE)
    stages = [a.split() for keyword, a in instructions if keyword == "FROM"]
    bases = {stage[2]: default_base(instructions, stage[0]) for stage in stages}
    assert bases["runtime"] == "nvidia/cuda:13.0.1-base-ubuntu24.04"
    assert bases["flash-attn-0"] == bases["runtime"]
    assert bases["flash-attn-1"] == "nvidia/cuda:13.0.1-devel-ubuntu24.04"


@pytest.mark.parametrize(
    "path", [WORKER_DOCKERFILE, LIGHT_DOCKERFILE, PROXY_DIR / "Dockerfile"],
    ids=lambda p: p.parent.name if p.name == "Dockerfile" else p.name,
)
def test_every_base_image_is_a_build_argument(path: Path):
    # ops/stack-check.sh builds the same recipe on stand-in bases (ops/README.md).
    instructions = dockerfile_instructions(path)
    global_args = [a for keyword, a in instructions[: first_from(instructions)]
                   if keyword == "ARG"]
    assert any(a.startswith("BASE_IMAGE=") for a in global_args), path.name
    stage_names = {a.split()[2] for keyword, a in instructions
                   if keyword == "FROM" and len(a.split()) == 3}
    for keyword, args in instructions:
        if keyword == "FROM":
            image = args.split()[0]
            # A base from a build argument, or an earlier stage (flash-attn-${WITH_FLASH_ATTN}).
            from_stage = default_base(instructions, image) in stage_names
            assert image.startswith("${") or from_stage, f"{path.name}: FROM {image}"


def installed_extras(path: Path) -> set[str]:
    """The extras of the project (`/src[...]`) that the image's final stage pip-installs."""
    found: set[str] = set()
    for keyword, args in final_stage(dockerfile_instructions(path)):
        if keyword == "RUN" and "pip install" in args:
            for group in re.findall(r"/src\[([^\]]+)\]", args):
                found.update(extra.strip() for extra in group.split(","))
    return found


def declared_extras() -> set[str]:
    """The names under pyproject.toml's [project.optional-dependencies]."""
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^([A-Za-z0-9][A-Za-z0-9_-]*)\s*=", section, re.MULTILINE))


# The extra each command run from the light image needs (pyproject.toml's optional deps).
EXTRA_FOR_COMMAND = {
    ("celery", "flower"): "monitor",
    ("producer", "serve"): "gateway",
    ("vq-exporter", "vq-exporter"): "monitor",
}


def test_light_image_installs_what_every_service_run_from_it_needs(compose: dict[str, Any]):
    # Given the services docker-compose.yml runs from the light image
    light = {
        name: service for name, service in compose["services"].items()
        if service.get("build", {}).get("dockerfile") == "ops/light.Dockerfile"
    }
    assert {"flower", "gateway"} <= set(light)
    extras = installed_extras(LIGHT_DOCKERFILE)
    declared = declared_extras()
    assert extras <= declared, f"the image installs extras pyproject.toml lacks: {extras}"
    for name, service in light.items():
        command = service["command"]
        needed = {extra for (program, word), extra in EXTRA_FOR_COMMAND.items()
                  if command[0] == program and word in command}
        # Then the image holds what each service's command imports
        assert needed, f"{name}: no known extra for {command}"
        assert needed <= extras, f"{name} runs {command} but the image lacks {needed - extras}"


def test_workers_sign_webhooks_with_the_secret_the_operator_sets(env: dict[str, str]):
    # Given an operator's .env with a webhook secret
    secret = "whsec-0123456789abcdef0123"
    services = load_compose({**env, "VQ_WEBHOOK_SECRET": secret})["services"]
    workers = {name: s for name, s in services.items() if name.startswith("worker-")}
    # Then every worker (which signs and sends webhooks) and the gateway get it
    for name, service in [*workers.items(), ("gateway", services["gateway"])]:
        assert as_dict(service["environment"]).get("VQ_WEBHOOK_SECRET") == secret, name


def test_build_context_holds_only_what_pip_install_needs():
    patterns = [
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    # Deny everything first: .git, .venv, .env (secrets), tests/data and caches stay out.
    assert patterns[0] == "*"
    let_in = {p[1:] for p in patterns if p.startswith("!")}
    packages = {"producer", "vision_queue", "worker"}
    assert let_in <= {"pyproject.toml", "README.md", "LICENSE", *packages}
    assert {"pyproject.toml", *packages} <= let_in
    assert "**/__pycache__" in patterns


# --- The CPU override (ops/compose.cpu.yml, run by ops/stack-check.sh) -----------------------

COMPOSE_CPU = ROOT / "ops" / "compose.cpu.yml"


class _ComposeLoader(yaml.SafeLoader):
    """YAML with Compose's merge tags: `!reset` (drop the value) and `!override`."""


_ComposeLoader.add_constructor("!reset", lambda loader, node: _RESET)
_ComposeLoader.add_constructor(
    "!override",
    lambda loader, node: loader.construct_mapping(node)  # type: ignore[arg-type]
    if isinstance(node, yaml.MappingNode) else loader.construct_sequence(node),  # type: ignore[arg-type]
)
_RESET = object()


def merge_override(base: Any, override: Any) -> Any:
    """Compose's merge of one override file: mappings merged, `environment` by name,
    `volumes` appended, `!reset` removes the key, anything else replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            if value is _RESET:
                merged.pop(key, None)
            elif key == "volumes" and isinstance(value, list):
                merged[key] = [*merged.get(key, []), *value]
            elif key in merged:
                merged[key] = merge_override(merged[key], value)
            else:
                merged[key] = value
        return merged
    return override


def test_the_cpu_override_runs_worker_0_on_the_cpu_with_the_small_checkpoint(env: dict[str, str]):
    # A SafeLoader with two more tags: nothing but plain data is built.
    override = yaml.load(COMPOSE_CPU.read_text(), Loader=_ComposeLoader)  # noqa: S506
    assert set(override["services"]) == {"worker-0"}, "the other services run as shipped"
    merged = merge_override(yaml.safe_load(COMPOSE_FILE.read_text()), override)
    worker = interpolate_tree(merged, env)["services"]["worker-0"]
    # Then no GPU reservation is left, and the worker is valid settings for the CPU
    assert "deploy" not in worker
    environment = as_dict(worker["environment"])
    settings = Settings.from_env(environment)
    assert environment["VQ_DEVICE"] == "cpu"
    # The model is the tests' checkpoint, mounted read-only where VQ_MODEL points
    mounts = {v.split(":")[1]: v for v in worker["volumes"]}
    mount = mounts[settings.model]
    source = mount.split(":")[0]
    assert mount.endswith(":ro")
    assert (ROOT / source).resolve() == ROOT / "tests" / "data" / "phi3v-reference" / "model"
    assert (ROOT / source / "config.json").is_file()
    assert any(v.endswith(":/hf-cache") for v in worker["volumes"]), "the base's volumes stay"
    # torch: a CPU build, not PyPI's CUDA wheel
    assert "cpu" in worker["build"]["args"]["TORCH_INDEX_URL"]
    assert worker["build"]["args"]["WITH_FLASH_ATTN"] == "0"
    schema = json.loads(SCHEMA_FILE.read_text())
    cpu_stack = interpolate_tree(merged, env)
    errors = list(jsonschema.Draft7Validator(schema).iter_errors(cpu_stack))
    assert not errors, [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]

"""Settings: read from the environment, validated at start, secrets masked when printed."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from vision_queue.protocol import TaskName
from vision_queue.redis_urls import mask_url
from vision_queue.setting_fields import READERS
from vision_queue.settings import Settings, SettingsError, settings_table

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_are_valid_and_route_to_the_gpu_queue():
    settings = Settings.from_env({})
    assert settings.queue == "gpu"
    assert settings.result_expires_s == 24 * 3600
    assert settings.visibility_timeout_s > settings.task_time_limit_s


def test_every_variable_is_read_and_converted():
    settings = Settings.from_env(
        {
            "REDIS_URL": "rediss://:pw@redis.example:6380/1",
            "VQ_QUEUE": "gpu-a100",
            "VQ_TASK_TIME_LIMIT_S": "30",
            "VQ_VISIBILITY_TIMEOUT_S": "60",
            "VQ_RETRY_BACKOFF_S": "0.5",
            "VQ_MAX_NEW_TOKENS_CAPS": "ocr=2048",
        }
    )
    assert settings.effective_broker_url == "rediss://:pw@redis.example:6380/1"
    assert settings.queue == "gpu-a100"
    assert settings.task_time_limit_s == 30
    assert settings.retry_backoff_s == 0.5
    assert settings.token_caps[TaskName.OCR] == 2048
    assert settings.token_caps[TaskName.DESCRIBE] == 512  # defaults fill the rest


def test_separate_broker_and_backend_urls_override_redis_url():
    settings = Settings.from_env(
        {"VQ_BROKER_URL": "redis://b:1/0", "VQ_RESULT_BACKEND_URL": "redis://r:2/0"}
    )
    assert settings.effective_broker_url == "redis://b:1/0"
    assert settings.effective_backend_url == "redis://r:2/0"


def test_a_visibility_timeout_not_above_the_time_limit_is_refused():
    with pytest.raises(SettingsError, match="VQ_VISIBILITY_TIMEOUT_S must be larger"):
        Settings.from_env({"VQ_TASK_TIME_LIMIT_S": "600", "VQ_VISIBILITY_TIMEOUT_S": "600"})


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"VQ_TASK_TIME_LIMIT_S": "ten"}, "VQ_TASK_TIME_LIMIT_S"),
        ({"REDIS_URL": "http://localhost"}, "REDIS_URL"),
        ({"VQ_MAX_NEW_TOKENS_CAPS": "paint=3"}, "VQ_MAX_NEW_TOKENS_CAPS"),
        ({"VQ_MAX_IMAGE_BYTES": "0"}, "VQ_MAX_IMAGE_BYTES"),
        ({"VQ_QUEUE": "gpu queue"}, "VQ_QUEUE"),
        ({"VQ_REMOTE_CONTROL": "everything"}, "VQ_REMOTE_CONTROL must be one of restricted"),
        (
            {"VQ_DOCUMENT_PAGE_MEMORY_BYTES": "300000000"},
            "VQ_DOCUMENT_PAGE_MEMORY_BYTES must be at least 908435456 bytes",
        ),
        (
            {"VQ_LONGROPE_SWITCH": "sometimes"},
            "VQ_LONGROPE_SWITCH must be one of auto, keep-cache, recompute",
        ),
    ],
)
def test_invalid_values_are_refused_naming_the_variable(env, named):
    with pytest.raises(SettingsError, match=named):
        Settings.from_env(env)


def test_passwords_never_appear_when_settings_are_printed():
    settings = Settings.from_env(
        {
            "REDIS_URL": "redis://user:s3cret@h:6379/0",
            "VQ_BROKER_URL": "redis://:other-s3cret@h:6379/0",
        }
    )
    for text in (repr(settings), str(settings), str(settings.masked())):
        assert "s3cret" not in text
    assert mask_url("redis://:pw@h:1/0") == "redis://:****@h:1/0"
    assert mask_url("redis://h:1/0") == "redis://h:1/0"


def test_the_docs_list_every_setting_with_its_default():
    docs = (ROOT / "docs" / "settings.md").read_text()
    assert settings_table() in docs


@pytest.mark.parametrize(
    "url",
    [
        "redis://:p#ss@h:6379/0",
        "redis://:pa/ss@h:6379/0",
        "redis://:p@ss@h:6379/0",
        "redis://user:s3cr?t@h:6379/0",
        "redis://h:6379/0?password=s3cret",
        "redis://h:6379/0?db=0&password=s3cret&ssl_cert_reqs=none",
        "unix:///run/redis.sock?password=s3cret&db=0",
    ],
)
def test_a_password_is_masked_whole_wherever_it_is_written(url: str):
    secret = url.split("password=")[1].split("&")[0] if "password=" in url else None
    settings = Settings.from_env({"REDIS_URL": url})
    for text in (mask_url(url), repr(settings), str(settings.masked())):
        assert "****" in text
        for part in ("p#ss", "ss@h", "pa/ss", "p@ss", "s3cr?t", secret or "p#ss"):
            assert part not in text


def test_a_query_password_becomes_the_userinfo_kombu_and_redis_py_both_read():
    settings = Settings.from_env({"REDIS_URL": "redis://h:6379/0?password=p%40ss&db=0"})
    assert settings.effective_broker_url == "redis://:p%40ss@h:6379/0?db=0"
    assert settings.effective_backend_url == settings.effective_broker_url
    raw = "redis://:pa#ss@h:6379/0"  # not percent-encoded: every parser misreads the host
    assert Settings.from_env({"REDIS_URL": raw}).effective_broker_url == "redis://:pa%23ss@h:6379/0"


@pytest.mark.parametrize(
    "url", ["redis://h:99999/0", "redis://h:port/0", "redis://:pw@h:0/0", "redis://:pw@:6379/0"]
)
def test_a_bad_port_or_host_is_a_clean_settings_error_without_the_password(url: str):
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"REDIS_URL": url})
    assert "REDIS_URL" in str(caught.value) and "pw" not in str(caught.value)


def test_private_host_entries_are_validated_and_canonical():
    settings = Settings.from_env({"VQ_ALLOWED_PRIVATE_HOSTS": "MinIO.corp:9000, 0x7f.1:8080, img"})
    assert settings.private_host_allowlist == {"minio.corp:9000", "127.0.0.1:8080", "img"}
    with pytest.raises(SettingsError, match="VQ_ALLOWED_PRIVATE_HOSTS"):
        Settings.from_env({"VQ_ALLOWED_PRIVATE_HOSTS": "minio:70000"})


def test_the_metrics_server_binds_to_loopback_unless_told():
    assert Settings.from_env({}).metrics_address == "127.0.0.1"
    assert Settings.from_env({"VQ_METRICS_ADDRESS": "0.0.0.0"}).metrics_address == "0.0.0.0"
    with pytest.raises(SettingsError, match="VQ_METRICS_ADDRESS"):
        Settings.from_env({"VQ_METRICS_ADDRESS": "not an address!"})


# --- Who reads each setting ---------------------------------------------------------------

WORKER_ONLY_FAULTS = [
    {"VQ_MAX_BATCH": "-1"},
    {"VQ_MAX_BATCH": "sixteen"},
    {"VQ_KV_CACHE_POSITIONS": "-5"},
    {"VQ_TASK_TIME_LIMIT_S": "600", "VQ_VISIBILITY_TIMEOUT_S": "60"},
    {"VQ_LEASE_TTL_S": "1", "VQ_HEARTBEAT_INTERVAL_S": "2"},
    {"VQ_REMOTE_CONTROL": "everything"},
    {"VQ_LONGROPE_SWITCH": "sometimes"},
    {"VQ_METRICS_ADDRESS": "not an address!"},
    {"VQ_METRICS_PORT": "70000"},
]
GATEWAY_ONLY_FAULTS = [
    {"VQ_API_KEYS": "too-short"},
    {"VQ_GATEWAY_MAX_BODY_BYTES": "0"},
    {"VQ_GATEWAY_ALLOW_ANONYMOUS": "maybe"},
]
CLIENT_FAULTS = [
    ({"REDIS_URL": "http://localhost"}, "REDIS_URL"),
    ({"VQ_QUEUE": "gpu queue"}, "VQ_QUEUE"),
    ({"VQ_MAX_IMAGES": "0"}, "VQ_MAX_IMAGES"),
    ({"VQ_MAX_NEW_TOKENS_CAPS": "paint=3"}, "VQ_MAX_NEW_TOKENS_CAPS"),
    ({"VQ_CONNECT_TIMEOUT_S": "soon"}, "VQ_CONNECT_TIMEOUT_S"),
    ({"REDIS_URL": "sentinel://s:26379"}, "VQ_REDIS_SENTINEL_MASTER"),
]


def test_every_setting_names_its_readers_and_whether_hosts_must_agree():
    for f in fields(Settings):
        readers = f.metadata["readers"]
        assert readers and set(readers) <= set(READERS), f.metadata["env"]
        assert list(readers) == [r for r in READERS if r in readers], f.metadata["env"]
        assert isinstance(f.metadata["same"], bool), f.metadata["env"]
        # The gateway serves through an AsyncClient: it reads whatever a client reads.
        assert "client" not in readers or "gateway" in readers, f.metadata["env"]


def test_the_docs_table_shows_every_setting_with_its_readers_and_same_column():
    docs = (ROOT / "docs" / "settings.md").read_text()
    rows = {
        line.split("|")[1].strip(" `"): [cell.strip() for cell in line.split("|")[2:-1]]
        for line in docs.splitlines()
        if line.startswith("| `")
    }
    assert set(rows) == {f.metadata["env"] for f in fields(Settings)}
    for f in fields(Settings):
        _, read_by, same, _ = rows[f.metadata["env"]]
        assert read_by == ", ".join(f.metadata["readers"])
        assert same == ("yes" if f.metadata["same"] else "no")


@pytest.mark.parametrize("env", WORKER_ONLY_FAULTS + GATEWAY_ONLY_FAULTS)
def test_a_client_ignores_settings_only_a_worker_or_the_gateway_reads(env):
    Settings.from_env(env, reader="client")
    with pytest.raises(SettingsError):  # a process that reads them all still hears about it
        Settings.from_env(env)


@pytest.mark.parametrize(("env", "named"), CLIENT_FAULTS)
def test_a_client_still_refuses_a_bad_setting_it_reads(env, named):
    with pytest.raises(SettingsError, match=named):
        Settings.from_env(env, reader="client")


@pytest.mark.parametrize("env", WORKER_ONLY_FAULTS)
def test_a_worker_refuses_a_bad_setting_it_reads(env):
    with pytest.raises(SettingsError):
        Settings.from_env(env, reader="worker")


@pytest.mark.parametrize("env", GATEWAY_ONLY_FAULTS)
def test_a_worker_ignores_settings_only_the_gateway_reads(env):
    Settings.from_env(env, reader="worker")
    with pytest.raises(SettingsError):
        Settings.from_env(env, reader="gateway")


def test_an_unconvertible_value_a_reader_skips_keeps_its_default():
    settings = Settings.from_env({"VQ_MAX_BATCH": "sixteen", "VQ_QUEUE": "q"}, reader="client")
    assert settings.max_batch == 0 and settings.queue == "q"
    assert Settings.from_env({"VQ_MAX_BATCH": "-1"}, reader="client").max_batch == -1


def test_a_secret_stays_masked_whoever_reads_it():
    settings = Settings.from_env({"VQ_API_KEYS": "short-secret"}, reader="client")
    assert "short-secret" not in repr(settings)
    assert settings.masked()["VQ_API_KEYS"] == "****"


@pytest.mark.parametrize(
    "module",
    [
        "vision_queue.setting_checks",
        "vision_queue.setting_values",
        "vision_queue.setting_fields",
        "vision_queue.sentinel",
        "vision_queue.redis_urls",
    ],
)
def test_the_settings_helpers_never_import_the_settings(module: str):
    # Not even for type hints: the settings import them, so dependencies point one way.
    source = (ROOT / (module.replace(".", "/") + ".py")).read_text()
    assert "vision_queue.settings" not in source and "import settings" not in source
    code = f"import sys, {module}; print('vision_queue.settings' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"

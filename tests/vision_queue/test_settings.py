"""Settings: read from the environment, validated at start, secrets masked when printed."""

from __future__ import annotations

from pathlib import Path

import pytest

from vision_queue.protocol import TaskName
from vision_queue.redis_urls import mask_url
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

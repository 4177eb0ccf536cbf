"""Settings: read from the environment, validated at start, secrets masked when printed."""

from __future__ import annotations

from pathlib import Path

import pytest

from producer.contract import TaskName
from producer.settings import Settings, SettingsError, mask_url, settings_table

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

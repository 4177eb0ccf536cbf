"""Sentinel URLs in the settings: Celery's `sentinel://...;sentinel://...` form, validated at
start, every sentinel kept, the password spread to each URL and masked whenever printed."""

from __future__ import annotations

import pytest

from vision_queue.celery_config import celery_settings
from vision_queue.redis_urls import mask_url
from vision_queue.sentinel import parse_sentinel_url
from vision_queue.settings import Settings, SettingsError

THREE = "sentinel://:s3cr%40t@10.0.0.1:26379/2;sentinel://10.0.0.2:26380;sentinel://s3:26381"
MASTER = {"VQ_REDIS_SENTINEL_MASTER": "mymaster"}


def test_several_sentinels_with_the_password_in_the_first_url_are_all_kept():
    settings = Settings.from_env({"REDIS_URL": THREE, **MASTER})
    target = parse_sentinel_url(settings.effective_broker_url)
    assert target.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26380), ("s3", 26381))
    assert target.password == "s3cr@t"
    assert target.db == 2
    assert settings.effective_backend_url == settings.effective_broker_url


def test_every_sentinel_url_carries_the_first_ones_password_and_database():
    # kombu reads them from whichever URL it tries after a failed connection attempt.
    url = Settings.from_env({"REDIS_URL": THREE, **MASTER}).effective_broker_url
    assert url.split(";") == [
        "sentinel://:s3cr%40t@10.0.0.1:26379/2",
        "sentinel://:s3cr%40t@10.0.0.2:26380/2",
        "sentinel://:s3cr%40t@s3:26381/2",
    ]
    with_query = "sentinel://:pw@a:1/3;sentinel://b:2?socket_timeout=1"
    assert Settings.from_env({"REDIS_URL": with_query, **MASTER}).effective_broker_url == (
        "sentinel://:pw@a:1/3;sentinel://:pw@b:2/3?socket_timeout=1"
    )


@pytest.mark.parametrize(
    ("url", "user", "password"),
    [
        ("sentinel://h:26379", None, None),
        ("sentinel://:pw@h:26379", None, "pw"),
        ("sentinel://app:pw@h:26379;sentinel://h2:26379", "app", "pw"),
        ("sentinel://:p;w@h:26379;sentinel://h2:26379", None, "p;w"),  # raw `;` in it
        ("sentinel://h:26379/0?password=pw;sentinel://h2:26379", None, "pw"),
    ],
)
def test_password_forms(url: str, user: str | None, password: str | None):
    settings = Settings.from_env({"REDIS_URL": url, **MASTER})
    target = parse_sentinel_url(settings.effective_broker_url)
    assert (target.username, target.password) == (user, password)
    assert target.sentinels[0] == ("h", 26379)


def test_a_sentinel_url_without_a_master_name_is_a_settings_error_at_start():
    with pytest.raises(SettingsError, match="VQ_REDIS_SENTINEL_MASTER") as caught:
        Settings.from_env({"VQ_BROKER_URL": THREE})
    assert "VQ_BROKER_URL" in str(caught.value)
    assert "s3cr" not in str(caught.value)


@pytest.mark.parametrize(
    ("url", "fault"),
    [
        ("sentinel://:pw@h:1;redis://:pw@h2:6379/0", "URL 2 is not sentinel://"),
        ("sentinel://:pw@h:99999", "URL 1 has an invalid port"),
        ("sentinel://:pw@h:1;sentinel://:pw@:2", "URL 2 has no host"),
        ("sentinel://:pw@h:1/x", "URL 1 has an invalid database"),
        ("sentinel://:pw@h:1/0;sentinel://:other@h2:2", "URL 2 names another password"),
        ("redis://:pw@h:1/0;redis://:pw@h2:2/0", "only sentinel:// URLs may be joined"),
    ],
)
def test_a_bad_sentinel_url_is_named_without_its_password(url: str, fault: str):
    with pytest.raises(SettingsError, match=fault) as caught:
        Settings.from_env({"REDIS_URL": url, **MASTER})
    assert "REDIS_URL" in str(caught.value) and "pw" not in str(caught.value)


def test_passwords_are_masked_in_every_sentinel_url_and_the_sentinel_password_whole():
    settings = Settings.from_env(
        {"REDIS_URL": THREE, "VQ_REDIS_SENTINEL_PASSWORD": "sentinel-secret", **MASTER}
    )
    printed = repr(settings)
    assert "s3cr" not in printed and "sentinel-secret" not in printed
    assert settings.masked()["VQ_REDIS_SENTINEL_PASSWORD"] == "****"
    assert mask_url(settings.effective_broker_url) == (
        "sentinel://:****@10.0.0.1:26379/2;sentinel://:****@10.0.0.2:26380/2;"
        "sentinel://:****@s3:26381/2"
    )


def test_celery_gets_the_master_name_and_the_sentinels_password_for_sentinel_urls_only():
    settings = Settings.from_env(
        {
            "VQ_BROKER_URL": THREE,
            "VQ_RESULT_BACKEND_URL": "redis://:pw@results:6379/0",
            "VQ_REDIS_SENTINEL_PASSWORD": "sentinel-secret",
            **MASTER,
        }
    )
    conf = celery_settings(settings)
    broker = conf["broker_transport_options"]
    assert broker["master_name"] == "mymaster"
    assert broker["sentinel_kwargs"]["password"] == "sentinel-secret"
    assert broker["visibility_timeout"] == settings.visibility_timeout_s
    assert "master_name" not in conf["result_backend_transport_options"]

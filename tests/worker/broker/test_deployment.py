"""One visibility timeout per Redis database: the first worker records it, others must match."""

from __future__ import annotations

import pytest
import redis

from vision_queue.protocol import VISIBILITY_TIMEOUT_KEY
from vision_queue.settings import Settings
from worker.broker.deployment import VisibilityTimeoutConflict, claim_visibility_timeout


def settings_with(redis_url: str, visibility_timeout_s: int) -> Settings:
    return Settings.from_env(
        {}, redis_url=redis_url, visibility_timeout_s=visibility_timeout_s, task_time_limit_s=5
    )


def test_the_first_worker_records_its_value_and_the_same_value_is_accepted(redis_url: str):
    client = redis.Redis.from_url(redis_url)
    claim_visibility_timeout(client, settings_with(redis_url, 3600))
    claim_visibility_timeout(client, settings_with(redis_url, 3600))  # a second worker
    assert client.get(VISIBILITY_TIMEOUT_KEY) == b"3600"
    # The record lasts one visibility timeout past the last refresh
    assert 3500 < client.ttl(VISIBILITY_TIMEOUT_KEY) <= 3600


def test_a_different_value_is_refused_naming_both_values_and_the_setting(redis_url: str):
    client = redis.Redis.from_url(redis_url)
    claim_visibility_timeout(client, settings_with(redis_url, 3600))
    with pytest.raises(VisibilityTimeoutConflict) as caught:
        claim_visibility_timeout(client, settings_with(redis_url, 10))
    message = str(caught.value)
    assert "VQ_VISIBILITY_TIMEOUT_S=10" in message and "VQ_VISIBILITY_TIMEOUT_S=3600" in message
    assert client.get(VISIBILITY_TIMEOUT_KEY) == b"3600"  # the running workers' value stays


def test_a_new_value_is_accepted_once_the_old_record_has_lapsed(redis_url: str):
    client = redis.Redis.from_url(redis_url)
    claim_visibility_timeout(client, settings_with(redis_url, 3600))
    client.delete(VISIBILITY_TIMEOUT_KEY)  # what expiry does one timeout after the last worker
    claim_visibility_timeout(client, settings_with(redis_url, 10))
    assert client.get(VISIBILITY_TIMEOUT_KEY) == b"10"

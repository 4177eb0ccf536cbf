"""A web backend's `Client()` validates only the settings a client reads.

A worker-only or gateway-only value in the backend's environment (copied from a shared
.env, say) must not stop it; a bad value the client itself reads still does. No Redis is
needed: constructing a client opens no connection.
"""

from __future__ import annotations

import asyncio

import pytest

from producer import AsyncClient, Client, SettingsError

NOT_READ_BY_A_CLIENT = {
    "VQ_MAX_BATCH": "sixteen",
    "VQ_KV_CACHE_POSITIONS": "-1",
    "VQ_TASK_TIME_LIMIT_S": "7200",  # above the visibility timeout: the worker refuses it
    "VQ_REMOTE_CONTROL": "everything",
    "VQ_METRICS_ADDRESS": "not an address!",
    "VQ_API_KEYS": "too-short",
    "VQ_GATEWAY_REQUEST_BURST": "-3",
}


@pytest.fixture
def backend_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://:pw@127.0.0.1:1/3")
    for name, value in NOT_READ_BY_A_CLIENT.items():
        monkeypatch.setenv(name, value)


@pytest.mark.usefixtures("backend_env")
def test_client_starts_despite_settings_only_workers_or_the_gateway_read() -> None:
    with Client() as client:
        assert client.settings.max_batch == 0  # unconvertible there: the default stays
        assert client.settings.task_time_limit_s == 7200
        assert "too-short" not in repr(client.settings)


@pytest.mark.usefixtures("backend_env")
def test_async_client_starts_despite_settings_only_workers_or_the_gateway_read() -> None:
    async def start() -> int:
        async with AsyncClient() as client:
            return client.settings.kv_cache_positions

    assert asyncio.run(start()) == -1


@pytest.mark.usefixtures("backend_env")
@pytest.mark.parametrize(
    ("name", "value"),
    [("VQ_QUEUE", "gpu queue"), ("VQ_MAX_IMAGES", "0"), ("VQ_CONNECT_TIMEOUT_S", "soon")],
)
def test_both_clients_refuse_a_bad_setting_they_read(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=name):
        Client()
    with pytest.raises(SettingsError, match=name):
        AsyncClient()


@pytest.mark.usefixtures("backend_env")
def test_overrides_are_checked_like_the_environment() -> None:
    with Client(max_batch=-1) as client:  # a worker-only override: not the client's
        assert client.settings.max_batch == -1
    with pytest.raises(SettingsError, match="VQ_MAX_IMAGES"):
        Client(max_images=0)

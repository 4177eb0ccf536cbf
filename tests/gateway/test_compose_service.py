"""The compose stack's gateway service: started as `producer serve`, checked, not exposed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]


def gateway_service() -> dict[str, Any]:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    return dict(services["gateway"])


def test_the_gateway_runs_producer_serve_once_redis_is_healthy():
    service = gateway_service()
    assert service["command"][:2] == ["producer", "serve"]
    assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "VQ_API_KEYS" in service["environment"]
    assert "@redis:6379" in service["environment"]["REDIS_URL"]


def test_the_gateway_has_a_healthcheck_on_its_liveness_probe():
    check = gateway_service()["healthcheck"]
    assert "/healthz" in " ".join(check["test"])
    assert check["retries"] >= 1


def test_the_gateway_is_published_on_loopback_unless_configured():
    (port,) = gateway_service()["ports"]
    assert port.startswith("${GATEWAY_HOST_IP:-127.0.0.1}:")
    assert port.endswith(":8000")

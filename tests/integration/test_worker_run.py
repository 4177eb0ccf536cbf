"""`worker run`: a worker that cannot load its model takes no message; transient faults retry."""

from __future__ import annotations

import pytest
from support.http_server import IMAGE_HOST, Route, serve
from support.workers import WorkerProcess

from producer import Client
from vision_queue.settings import Settings

pytestmark = pytest.mark.timeout(300)


def test_a_failed_load_exits_non_zero_and_consumes_nothing(redis_url: str, tmp_path, images):
    # Given a queued task
    with Client(Settings.from_env({}, redis_url=redis_url)) as client:
        handle = client.submit("describe", [(images / "small_400x300.jpg").read_bytes()])
        # When a worker starts with weights it cannot load
        worker = WorkerProcess(redis_url, tmp_path, VQ_MODEL=str(tmp_path / "no-such-model"))
        worker.start(wait_ready=False)
        code = worker.wait(timeout_s=120)
        worker.stop()
        # Then it exits non-zero, says why, and the message is still queued for a real worker
        assert code != 0
        assert "model failed to load" in worker.log()
        assert client._redis.llen("gpu") == 1
        assert client.status(handle.id).state == "PENDING"


def test_a_transient_fetch_failure_is_retried_until_it_succeeds(redis_url: str, tmp_path, images):
    image = (images / "small_400x300.jpg").read_bytes()
    attempts: list[int] = []

    class Flaky(dict[str, Route]):
        """Answers 503 the first time, then the image."""

        def get(self, path: str, default: Route | None = None) -> Route | None:
            attempts.append(1)
            return Route(503, b"busy") if len(attempts) == 1 else Route(200, image, "image/jpeg")

    env = {"VQ_ALLOWED_PRIVATE_HOSTS": IMAGE_HOST, "VQ_RETRY_BACKOFF_S": "0.2"}
    settings = Settings.from_env({}, redis_url=redis_url, allowed_private_hosts=IMAGE_HOST)
    with (
        serve(Flaky()) as server,
        WorkerProcess(redis_url, tmp_path, **env) as worker,
        Client(settings) as client,
    ):
        handle = client.submit("describe", [server.url("/photo.jpg")])
        result = client.result(handle.id, wait=True, timeout=120)
    assert result is not None and result["state"] == "SUCCESS", result
    assert len(attempts) == 2
    assert "outcome=retry" in worker.log()

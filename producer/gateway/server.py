"""`producer serve`: run the gateway under uvicorn, one or several processes."""

from __future__ import annotations

import logging
import signal
import sys
from types import FrameType

from vision_queue.settings import Settings


def serve(host: str, port: int, workers: int = 1) -> None:
    """Block serving HTTP until interrupted; settings come from the environment."""
    import uvicorn

    settings = Settings.from_env(reader="gateway")
    from producer.gateway.app import create_app
    from producer.gateway.connections import uvicorn_options

    create_app(settings)  # refuses a bad configuration here, before any process starts
    logging.basicConfig(
        level=settings.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("vision_queue.gateway").info(
        "gateway on %s:%d (%d process(es)); queue %s; %s",
        host,
        port,
        workers,
        settings.queue,
        f"API keys: {len(settings.api_key_digests)}"
        if settings.api_key_digests
        else "anonymous access",
    )
    _stop_with_status_0()
    uvicorn.run(
        "producer.gateway.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=settings.log_level.lower(),
        # The gateway writes its own access lines (producer/gateway/logs.py): no query
        # string (a key may be in it), clipped, and refusals once per interval.
        access_log=False,
        timeout_graceful_shutdown=30,
        **uvicorn_options(settings),
    )


def _stop_with_status_0() -> None:
    """A SIGTERM or SIGINT ends `serve` with status 0 once uvicorn has shut down.

    uvicorn drains the requests in flight, shuts the app down, then raises the signal again
    for whoever embeds it; with the default handlers the process then died of it (status
    143 for SIGTERM), which supervisors report as a crash. Raised here, it exits cleanly.
    A signal before uvicorn takes the signals over stops the process at once, as cleanly:
    nothing is served yet. With several processes uvicorn's supervisor handles the signals
    itself and returns.
    """

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)

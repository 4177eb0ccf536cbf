"""`producer serve`: run the gateway under uvicorn, one or several processes."""

from __future__ import annotations

import logging
import sys

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

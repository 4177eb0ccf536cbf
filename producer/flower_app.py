"""The Celery app Flower loads (`celery -A producer.flower_app:app flower`).

It carries the same broker, backend and serializer settings as the workers, so Flower
reads task events and results exactly as they are stored.

Loaded by Flower, it also makes Flower's own pages tell the truth about our workers, with
or without the proxy in front (ops/flower-proxy; the demo runs Flower alone):

- the pool controls (Restart Pool, Grow, Shrink, Autoscale) are hidden: a worker runs one
  thread per batch row (worker/runner.py), a pool Celery cannot resize or restart, and the
  workers refuse those commands anyway;
- "Shut Down" asks the worker for its answer and shows it: a worker refuses the command
  unless it runs with VQ_REMOTE_CONTROL=full (worker/broker/remote_control.py), and Flower
  used to report "Shutting down!" without waiting for a reply.
"""

from __future__ import annotations

from typing import Any

from vision_queue.celery_config import make_celery_app
from vision_queue.settings import Settings

# The controls no worker of ours accepts, hidden from every page (the proxy hides them too).
HIDDEN_CONTROLS_STYLE = (
    b"<style>#worker-pool-restart,.worker-controls-panel{display:none!important}</style>"
)
# Seconds Flower waits for a worker's answer to a shutdown; a worker that shuts down sends
# none (Celery raises before replying), a refusing one answers at once.
SHUTDOWN_REPLY_TIMEOUT_S = 2.0


def _install_flower_patches() -> None:
    try:
        from flower.api import control as flower_control
        from flower.views import BaseHandler
        from tornado import web
    except ImportError:  # not loaded by Flower (the monitor extra is missing): nothing to do
        return
    if getattr(BaseHandler, "_vq_patched", False):
        return

    original_render_string = BaseHandler.render_string

    def render_string(self: Any, template_name: str, **kwargs: Any) -> bytes:
        html: bytes = original_render_string(self, template_name, **kwargs)
        return html.replace(b"</head>", HIDDEN_CONTROLS_STYLE + b"</head>", 1)

    async def shutdown(self: Any, workername: str) -> None:
        if self.application.options.read_only:
            raise web.HTTPError(403, "Read only mode is enabled")
        if not self.is_worker(workername):
            raise web.HTTPError(404, f"Unknown worker '{workername}'")
        response = await self.run_blocking(
            "worker.shutdown", workername, self.capp.control.broadcast, "shutdown",
            destination=[workername], reply=True, timeout=SHUTDOWN_REPLY_TIMEOUT_S,
        )
        for reply in response or []:
            answer = reply.get(workername) if isinstance(reply, dict) else None
            if isinstance(answer, dict) and "error" in answer:
                self.set_status(403)
                self.write(f"Not shut down: {answer['error']}")
                return
        self.write({"message": "Shutting down!"})

    BaseHandler.render_string = render_string
    flower_control.WorkerShutDown.post = web.authenticated(shutdown)
    BaseHandler._vq_patched = True


_install_flower_patches()
app = make_celery_app(Settings.from_env(reader="client"))

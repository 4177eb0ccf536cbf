"""The HTTP gateway: an OpenAI-compatible API and a native task API over the queue.

    producer serve --host 0.0.0.0 --port 8000          # needs the `gateway` extra

Stateless: every process holds only connections, so any number of them can run behind a
load balancer and share nothing but Redis (tasks, results, streams, limits). Modules:

* `app`: builds the FastAPI application (lifespan, middleware, routers);
* `openai_routes` / `chat`: `POST /v1/chat/completions`, `GET /v1/models`, and the
  translation of OpenAI messages into the contract's conversation;
* `task_routes` / `wire`: the native task API and its request/result schemas;
* `resolve`: image and callback host names resolved and checked at submission;
* `door`: what every request meets before a route reads its body (request id, the
  failed-key budget per address, the API key, the route's body cap);
* `connections`: uvicorn's h11 protocol with header and body deadlines and a cap on open
  connections; `logs`: log lines bounded under floods, without secrets;
* `auth`, `limits`: API keys, per-key limits in Redis;
* `errors`: every failure as one error shape, in one place;
* `sse`, `disconnect`: event-stream framing, and cancelling when a caller goes away;
* `health`, `metrics`, `server`;
* OpenAI's platform APIs (docs/platform.md): `files` (`/v1/files`), `batches`,
  `batch_store`, `batch_lines`, `batch_feeder` (`/v1/batches` and the background task
  that runs them), `responses` / `responses_routes` (`POST /v1/responses`),
  `idempotency` (the `Idempotency-Key` header), `usage` (`GET /v1/usage`, usage counters).

It imports nothing from `worker`.
"""

"""Image bytes staged in Redis under their content hash, so messages stay small.

Producers stage the bytes in the same pipeline that queues the message
(`producer/envelope.py`); workers read them back here, under `STAGED_IMAGE_KEY`. The same
image submitted twice is stored once. Staged bytes expire with the results
(VQ_RESULT_EXPIRES_S); a worker that finds them gone fails the task permanently.
"""

from __future__ import annotations

import hashlib

import redis

from vision_queue.errors import ImageFetchFailed
from vision_queue.protocol import STAGED_IMAGE_KEY


def load_staged_image(client: redis.Redis, digest: str) -> bytes:
    """The staged bytes of `digest`, checked against it (a coded error when gone or wrong)."""
    try:
        data = client.get(STAGED_IMAGE_KEY.format(digest=digest))
    except redis.ResponseError as exc:
        # Someone stored a hash or list under the key: the request's fault, not Redis's.
        # Any other ResponseError (out of memory, read-only replica) is about Redis itself.
        if not str(exc).startswith("WRONGTYPE"):
            raise
        raise ImageFetchFailed(
            f"staged image {digest[:12]}… is not an image (wrong Redis type)", field="images"
        ) from None
    if not isinstance(data, bytes):
        raise ImageFetchFailed(
            f"staged image {digest[:12]}… is gone (expired or never staged)", field="images"
        )
    if hashlib.sha256(data).hexdigest() != digest:
        # Anyone with the Redis password could overwrite the key; never answer about other bytes.
        raise ImageFetchFailed(
            f"staged image {digest[:12]}… does not match its hash", field="images"
        )
    return data

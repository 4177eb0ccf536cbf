"""OpenAI's Files API, for batch input and output: `/v1/files`.

    POST   /v1/files               multipart: `file` (JSONL), `purpose=batch`
    GET    /v1/files               the caller's files, newest first (limit, after, purpose)
    GET    /v1/files/{id}          the file object
    GET    /v1/files/{id}/content  the bytes
    DELETE /v1/files/{id}

Files live in Redis, so every gateway process behind a load balancer sees the same ones:
`vq:gw:file:{id}` (a hash: `meta`, the file object as JSON, and `content`) and, per key,
`vq:gw:files:{key_id}` (a sorted set by creation time) with `vq:gw:file-sizes:{key_id}`
(bytes per file). A file belongs to the key that created it; any other key gets 404.

Limits: `MAX_FILE_BYTES` per uploaded file, `MAX_KEY_BYTES` of uploads held per key at
once (expired and deleted files free their share), files kept `RETENTION_S` after
creation. Batch output and error files are written by the batch feeder, belong to the
batch's key, are not held against its upload quota, and are kept `RETENTION_S` too.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile

from producer.gateway.errors import ApiError, GatewayCode
from producer.gateway.listing import list_page
from producer.gateway.state import Authorized, GatewayState, state_of
from vision_queue.errors import InvalidInput
from vision_queue.protocol import KEY_PREFIX

FILE_KEY = KEY_PREFIX + ":gw:file:{file_id}"
KEY_FILES_KEY = KEY_PREFIX + ":gw:files:{key_id}"
KEY_SIZES_KEY = KEY_PREFIX + ":gw:file-sizes:{key_id}"
MAX_FILE_BYTES = 32 * 1024 * 1024
MAX_KEY_BYTES = 256 * 1024 * 1024
RETENTION_S = 7 * 24 * 3600
PURPOSES = ("batch",)

# KEYS: the file, the key's index, the key's sizes. ARGV: id, meta, content, the index's
# score (creation time in microseconds: files of one second list in upload order), size,
# quota (0: none), retention seconds, key prefix of files. Frees the shares of files gone
# (expired or deleted), refuses past the quota, then stores. -> 1, or 0 (full).
_STORE = """
local ids = redis.call('HKEYS', KEYS[3])
local held = 0
for _, id in ipairs(ids) do
  if redis.call('EXISTS', ARGV[8] .. id) == 0 then
    redis.call('HDEL', KEYS[3], id)
    redis.call('ZREM', KEYS[2], id)
  else
    held = held + tonumber(redis.call('HGET', KEYS[3], id))
  end
end
if tonumber(ARGV[6]) > 0 and held + tonumber(ARGV[5]) > tonumber(ARGV[6]) then return 0 end
redis.call('HSET', KEYS[1], 'meta', ARGV[2], 'content', ARGV[3])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[7]))
redis.call('ZADD', KEYS[2], tonumber(ARGV[4]), ARGV[1])
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[7]))
if tonumber(ARGV[6]) > 0 then
  redis.call('HSET', KEYS[3], ARGV[1], ARGV[5])
  redis.call('EXPIRE', KEYS[3], tonumber(ARGV[7]))
end
return 1
"""

router = APIRouter(prefix="/v1/files", tags=["Files"])
_MISSING: dict[int | str, dict[str, Any]] = {404: {"description": "No such file for this key."}}


def new_file_id() -> str:
    return "file-" + secrets.token_hex(12)


def file_object(
    file_id: str, size: int, filename: str, purpose: str, created: int
) -> dict[str, Any]:
    return {
        "id": file_id,
        "object": "file",
        "bytes": size,
        "created_at": created,
        "expires_at": created + RETENTION_S,
        "filename": filename,
        "purpose": purpose,
        "status": "processed",
        "status_details": None,
    }


async def store(
    state: GatewayState,
    key_id: str,
    content: bytes,
    filename: str,
    purpose: str,
    *,
    file_id: str | None = None,
    quota: bool = True,
) -> dict[str, Any]:
    """Store a file for `key_id`; 400 `storage_limit` when its uploads would pass the quota."""
    created = int(time.time())
    file_id = file_id or new_file_id()
    meta = file_object(file_id, len(content), filename, purpose, created)
    keys = [
        FILE_KEY.format(file_id=file_id),
        KEY_FILES_KEY.format(key_id=key_id),
        KEY_SIZES_KEY.format(key_id=key_id),
    ]
    stored = await state.redis.eval(
        _STORE,
        3,
        *keys,
        file_id,
        json.dumps({**meta, "owner": key_id}),
        content,
        time.time_ns() // 1000,
        len(content),
        MAX_KEY_BYTES if quota else 0,
        RETENTION_S,
        FILE_KEY.format(file_id=""),
    )
    if not stored:
        raise ApiError(
            400,
            "storage_limit",
            f"this key's files would pass {MAX_KEY_BYTES} bytes; delete some first",
            param="file",
        )
    return meta


async def meta_of(state: GatewayState, key_id: str, file_id: str) -> dict[str, Any]:
    """The file object; 404 if it does not exist for this key."""
    raw = await state.redis.hget(FILE_KEY.format(file_id=file_id[:100]), "meta")
    meta = json.loads(raw) if raw else None
    if meta is None or meta.pop("owner", None) != key_id:
        raise ApiError(404, GatewayCode.NOT_FOUND.value, f"no file {file_id[:100]!r}")
    return dict(meta)


async def content_of(state: GatewayState, key_id: str, file_id: str) -> bytes:
    await meta_of(state, key_id, file_id)
    content = await state.redis.hget(FILE_KEY.format(file_id=file_id), "content")
    if content is None:
        raise ApiError(404, GatewayCode.NOT_FOUND.value, f"no file {file_id[:100]!r}")
    return content if isinstance(content, bytes) else content.encode()


@router.post(
    "",
    summary="Upload a JSONL file (purpose=batch)",
    responses={413: {"description": f"The file has more than {MAX_FILE_BYTES} bytes."}},
)
async def upload_file(request: Request, who: Authorized) -> JSONResponse:
    state = state_of(request)
    form = await request.form(max_files=1, max_fields=4)
    try:
        purpose = form.get("purpose")
        if purpose not in PURPOSES:
            raise InvalidInput("purpose must be 'batch'", field="purpose")
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InvalidInput("send the file as the multipart field 'file'", field="file")
        content = await upload.read(MAX_FILE_BYTES + 1)
        filename = (upload.filename or "upload.jsonl")[:255]
    finally:
        await form.close()
    if len(content) > MAX_FILE_BYTES:
        raise ApiError(
            413,
            GatewayCode.REQUEST_TOO_LARGE.value,
            f"a file may have at most {MAX_FILE_BYTES} bytes",
            param="file",
        )
    try:
        content.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput("a batch file is UTF-8 JSONL", field="file") from None
    meta = await store(state, who.key_id, content, filename, str(purpose))
    return JSONResponse(meta)


@router.get("", summary="The caller's files, newest first")
async def list_files(
    request: Request,
    who: Authorized,
    purpose: str | None = None,
    limit: int = Query(20, ge=1, le=10000),
    after: str | None = None,
    order: Literal["asc", "desc"] = "desc",
) -> dict[str, Any]:
    state = state_of(request)
    index = KEY_FILES_KEY.format(key_id=who.key_id)
    found = await state.redis.zrange(index, 0, -1, desc=order == "desc")
    ids = [_text(i) for i in found]  # type: ignore[arg-type]

    async def load(file_ids: list[str]) -> list[dict[str, Any] | None]:
        pipe = state.redis.pipeline(transaction=False)
        for file_id in file_ids:
            pipe.hget(FILE_KEY.format(file_id=file_id), "meta")
        return [_listed(raw, purpose) for raw in await pipe.execute()]

    return await list_page(ids, after, limit, load)


def _listed(raw: Any, purpose: str | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    meta: dict[str, Any] = json.loads(raw)
    meta.pop("owner", None)
    return meta if purpose is None or meta["purpose"] == purpose else None


@router.get("/{file_id}", summary="A file object", responses=_MISSING)
async def get_file(file_id: str, request: Request, who: Authorized) -> dict[str, Any]:
    return await meta_of(state_of(request), who.key_id, file_id)


@router.get("/{file_id}/content", summary="A file's bytes", responses=_MISSING)
async def get_file_content(file_id: str, request: Request, who: Authorized) -> Response:
    content = await content_of(state_of(request), who.key_id, file_id)
    return Response(content, media_type="application/octet-stream")


@router.delete("/{file_id}", summary="Delete a file", responses=_MISSING)
async def delete_file(file_id: str, request: Request, who: Authorized) -> dict[str, Any]:
    state = state_of(request)
    await meta_of(state, who.key_id, file_id)
    pipe = state.redis.pipeline(transaction=True)
    pipe.delete(FILE_KEY.format(file_id=file_id))
    pipe.zrem(KEY_FILES_KEY.format(key_id=who.key_id), file_id)
    pipe.hdel(KEY_SIZES_KEY.format(key_id=who.key_id), file_id)
    await pipe.execute()
    return {"id": file_id, "object": "file", "deleted": True}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value

"""A client's submit under an idempotency key, decided without I/O (producer.idempotency)."""

from __future__ import annotations

import json

import pytest

from producer import idempotency
from producer.idempotency import ClientClaim, IdempotencyConflict
from vision_queue.errors import WaitTimeout


def held(task_id: str, fingerprint: str, done: bool) -> list[bytes]:
    """CLAIM's reply when the key already has a record."""
    record = {"f": fingerprint, "id": task_id, "done": int(done)}
    return [b"held", json.dumps(record).encode()]


def test_a_free_key_is_claimed_under_the_new_id() -> None:
    claim = ClientClaim("order-17", "fp")
    assert claim.claim("t-new")[2:5] == (claim.record, "fp", "t-new")
    found = claim.decide([b"new", b"t-new"])
    assert found is not None and (found.kind, found.id) == ("new", "t-new")


def test_a_finished_request_with_the_same_key_and_request_gets_its_task() -> None:
    found = ClientClaim("order-17", "fp").decide(held("t-1", "fp", done=True))
    assert found is not None and (found.kind, found.id) == ("done", "t-1")


def test_a_pending_claim_is_waited_for_then_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    claim = ClientClaim("order-17", "fp")
    # Given another request still holding the key: poll again (None) until the deadline
    assert claim.decide(held("t-1", "fp", done=False)) is None
    monkeypatch.setattr(idempotency.time, "monotonic", lambda: claim.deadline + 1)
    with pytest.raises(WaitTimeout):
        claim.decide(held("t-1", "fp", done=False))


def test_the_same_key_with_another_request_is_a_conflict_naming_the_field() -> None:
    with pytest.raises(IdempotencyConflict) as caught:
        ClientClaim("order-17", "fp").decide(held("t-1", "other", done=True))
    assert caught.value.field == "idempotency_key"

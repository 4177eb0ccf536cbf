"""API keys: only hashes are kept, any configured key works, nothing else does."""

from __future__ import annotations

import hashlib

import pytest

from producer.gateway.auth import ANONYMOUS, KeyRing
from vision_queue.settings import Settings, SettingsError

KEY_A = "vq-key-a-0123456789abcdef"
KEY_B = "vq-key-b-fedcba9876543210"


def ring(entries: str, **changes) -> KeyRing:
    settings = Settings.from_env({"VQ_API_KEYS": entries}, **changes)
    return KeyRing(settings.api_key_digests, allow_anonymous=settings.gateway_allow_anonymous)


def test_raw_keys_and_their_sha256_entries_both_work():
    digest_b = hashlib.sha256(KEY_B.encode()).hexdigest()
    keys = ring(f"{KEY_A}, sha256:{digest_b}")

    a, b = keys.identify(KEY_A), keys.identify(KEY_B)
    assert a is not None and b is not None and a != b
    # A caller is known by its key's hash prefix, never by the key.
    assert b.key_id == digest_b[:12]
    assert KEY_A not in a.key_id


@pytest.mark.parametrize("presented", [None, "", "wrong-key-0123456789", KEY_A[:-1], KEY_A + "x"])
def test_anything_but_a_configured_key_is_refused(presented):
    assert ring(KEY_A).identify(presented) is None


def test_the_settings_hold_no_key_in_the_clear():
    settings = Settings.from_env({"VQ_API_KEYS": KEY_A})
    assert KEY_A not in repr(settings)
    assert KEY_A not in str(settings.api_key_digests)


@pytest.mark.parametrize("entries", ["short", "sha256:1234", f"{KEY_A},tiny"])
def test_weak_or_malformed_keys_stop_the_start_without_echoing_them(entries):
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"VQ_API_KEYS": entries})
    assert "tiny" not in str(caught.value) and "short" not in str(caught.value)


def test_anonymous_access_needs_saying_so_and_no_keys():
    assert ring("", gateway_allow_anonymous=True).identify(None).key_id == ANONYMOUS
    # Keys configured: anonymous access is off whatever the flag says.
    assert ring(KEY_A, gateway_allow_anonymous=True).identify(None) is None

"""`worker run`'s start: what it does before and after the consumer is up."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields

import pytest

from vision_queue.settings import Settings
from worker import cli


def test_worker_run_pauses_the_collector_until_the_consumer_is_up() -> None:
    code = (
        "import gc\n"
        "from celery.signals import worker_ready\n"
        "from worker import cli\n"
        "cli._pause_collector_until_consuming()\n"
        "paused = not gc.isenabled()\n"
        "worker_ready.send(sender=None)\n"
        "print(paused, gc.isenabled(), gc.get_freeze_count() > 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)

    assert done.stdout.split() == ["True", "True", "True"]


def test_a_wrong_redis_password_is_reported_as_an_authentication_error(redis_url: str) -> None:
    from support.redis_server import PASSWORD
    from support.workers import base_env, run_cli

    wrong = redis_url.replace(PASSWORD, "not-the-password")
    done = run_cli("worker", ["dead-letters"], base_env(wrong), timeout_s=60)
    assert done.returncode == 3
    assert "authentication failed" in done.stderr and "REDIS_URL" in done.stderr
    assert "unreachable" not in done.stderr and "not-the-password" not in done.stderr


def test_worker_settings_shows_who_reads_each_and_whether_hosts_must_agree(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://:hunter2-secret@h:6379/0")
    monkeypatch.setenv("VQ_API_KEYS", "too-short")  # only the gateway reads it
    assert cli.main(["settings"]) == 0
    note, *lines = capsys.readouterr().out.splitlines()
    # It says whose values these are: this shell's, not a running worker's.
    assert note.startswith("# ") and "this shell's environment (" in note
    assert "not those of a running worker" in note
    assert lines[0].split() == ["read", "by", "same", "setting"]
    same_at, setting_at = lines[0].index("same"), lines[0].index("setting")
    rows = {line[setting_at:].partition("=")[0]: line for line in lines[1:]}
    assert set(rows) == {f.metadata["env"] for f in fields(Settings)}
    for f in fields(Settings):
        row = rows[f.metadata["env"]]
        assert row[:same_at].strip() == ", ".join(f.metadata["readers"])
        assert row[same_at:setting_at].strip() == ("yes" if f.metadata["same"] else "no")
    assert rows["REDIS_URL"].endswith("REDIS_URL=redis://:****@h:6379/0")
    assert rows["VQ_API_KEYS"].endswith("VQ_API_KEYS=****")
    assert "hunter2" not in "\n".join(lines) and "too-short" not in "\n".join(lines)
    # What a row does at the LongRoPE switch: by default, what the checkpoint says.
    assert rows["VQ_LONGROPE_SWITCH"].split() == ["worker", "no", "VQ_LONGROPE_SWITCH=auto"]


def test_worker_settings_shows_a_forced_longrope_switch(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("VQ_LONGROPE_SWITCH", "recompute")

    assert cli.main(["settings"]) == 0

    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[-1] for line in lines if "VQ_LONGROPE_SWITCH" in line] == [
        "VQ_LONGROPE_SWITCH=recompute"
    ]


@pytest.mark.parametrize(
    ("name", "value"), [("VQ_MAX_BATCH", "-1"), ("VQ_MAX_BATCH", "many"), ("VQ_QUEUE", "a b")]
)
def test_the_worker_refuses_to_start_on_a_bad_setting_it_reads(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    assert cli.main(["settings"]) == cli.EXIT_USAGE
    assert name in capsys.readouterr().err

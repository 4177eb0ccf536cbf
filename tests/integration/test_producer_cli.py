"""`producer` on the command line: every task, polling, cancel, and the documented exit codes."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.redis_server import PASSWORD, free_port
from support.workers import base_env, run_cli

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def env(module_redis, shared_worker) -> dict[str, str]:
    return base_env(module_redis.url)


def producer(env: dict[str, str], *args: str, timeout_s: float = 120):
    return run_cli("producer", list(args), env, timeout_s)


@pytest.mark.parametrize(
    ("task", "files", "extra"),
    [
        ("describe", ["shapes_640x480.png"], []),
        ("ocr", ["doc_900x600.png"], []),
        ("compare", ["shapes_640x480.png", "poster_500x700.jpg"], []),
        ("ask", ["small_400x300.jpg"], ["--prompt", "What colour dominates?"]),
    ],
)
def test_submit_wait_json_prints_the_result_with_its_state(env, images: Path, task, files, extra):
    image_args = [arg for name in files for arg in ("--image", str(images / name))]
    done = producer(
        env,
        "submit",
        "--task",
        task,
        *image_args,
        *extra,
        "--max-new-tokens",
        "6",
        "--wait",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    assert "no worker" not in done.stderr  # the shared worker announces itself on the queue
    result = json.loads(done.stdout)
    assert result["state"] == "SUCCESS"
    assert result["task"] == task
    assert result["usage"]["completion_tokens"] <= 6
    assert set(result["timings"]) == {"queued", "fetch", "preprocess", "generate", "total"}


def test_submit_without_wait_prints_the_id_then_status_and_result_follow_it(env, images: Path):
    submitted = producer(
        env, "submit", "--task", "describe", "--image", str(images / "small_400x300.jpg"), "--json"
    )
    assert submitted.returncode == 0, submitted.stderr
    task_id = json.loads(submitted.stdout)["id"]

    plain = producer(
        env, "submit", "--task", "describe", "--image", str(images / "small_400x300.jpg")
    )
    assert plain.stdout.strip().count("-") == 4  # a bare UUID

    result = producer(env, "result", task_id, "--wait", "--timeout", "120", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["id"] == task_id
    status = producer(env, "status", task_id, "--json")
    assert json.loads(status.stdout)["state"] == "SUCCESS"
    text = producer(env, "result", task_id)
    assert text.returncode == 0


def test_invalid_input_exits_2_and_queues_nothing(env, images: Path, module_redis):
    before = module_redis.client().llen("gpu")
    one_image = producer(
        env, "submit", "--task", "compare", "--image", str(images / "small_400x300.jpg")
    )
    assert one_image.returncode == 2
    assert "invalid_input (images)" in one_image.stderr
    unreadable = producer(env, "submit", "--task", "describe", "--image", "/nonexistent/x.png")
    assert unreadable.returncode == 2
    not_an_image = producer(env, "submit", "--task", "describe", "--image", __file__)
    assert not_an_image.returncode == 2
    assert "unsupported_image" in not_an_image.stderr
    unknown_task = producer(env, "submit", "--task", "paint", "--image", "x.png")
    assert unknown_task.returncode == 2
    internal_url = producer(
        env, "submit", "--task", "describe", "--image", "http://169.254.169.254/latest/meta-data"
    )
    assert internal_url.returncode == 2
    assert "image_fetch_failed" in internal_url.stderr
    assert module_redis.client().llen("gpu") == before


def test_a_failed_task_exits_1_with_its_code(env, images: Path):
    # The worker's cap for `ask` is 64, the prompt asks it to run out of memory (fault injection).
    done = producer(
        env, "submit", "--task", "ask", "--prompt", "__OOM__ please", "--wait", "--json"
    )
    assert done.returncode == 1
    assert json.loads(done.stdout)["error"]["code"] == "resource_exhausted"


def test_an_unreachable_broker_exits_3_quickly(images: Path):
    dead = base_env(f"redis://:pw@127.0.0.1:{free_port()}/0", VQ_CONNECT_TIMEOUT_S="2")
    began = time.monotonic()
    done = producer(
        dead, "submit", "--task", "describe", "--image", str(images / "small_400x300.jpg")
    )
    assert done.returncode == 3
    assert "unreachable" in done.stderr
    assert "pw" not in done.stderr  # the password is masked
    assert time.monotonic() - began < 20


def test_waiting_past_the_timeout_exits_4(env):
    # A queue no worker consumes: the task stays queued however fast the workers are.
    done = producer(
        {**env, "VQ_QUEUE": "nobody-listens"},
        "submit",
        "--task",
        "ask",
        "--prompt",
        "Count to ten.",
        "--wait",
        "--timeout",
        "1",
    )
    assert done.returncode == 4
    assert "did not finish" in done.stderr


def test_cancel_of_an_unknown_id_exits_2(env):
    done = producer(env, "cancel", "00000000-0000-4000-8000-000000000000")
    assert done.returncode == 2


def test_help_documents_the_exit_codes(env):
    done = producer(env, "submit", "--help")
    assert done.returncode == 0
    lines = ("0  success", "1  the task failed", "2  usage", "3  Redis unusable", "4  timed out")
    for line in lines:
        assert line in done.stdout


# --- The first hour (issue 13, item 3) -----------------------------------------------------


def submitted_and_finished(env: dict[str, str], images: Path) -> dict:
    done = producer(
        env, "submit", "--task", "describe", "--image", str(images / "small_400x300.jpg"),
        "--max-new-tokens", "4", "--wait", "--json",
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_an_image_on_stdin_is_read_with_image_dash(env, images: Path):
    done = subprocess.run(
        [sys.executable, "-m", "producer.cli", "submit", "--task", "describe", "--image", "-",
         "--max-new-tokens", "4", "--wait", "--json"],
        env=env, input=(images / "small_400x300.jpg").read_bytes(), capture_output=True,
        timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["state"] == "SUCCESS"


def test_status_and_result_of_a_finished_task_show_its_outcome_and_tokens(env, images: Path):
    result = submitted_and_finished(env, images)
    tokens = result["usage"]["completion_tokens"]
    assert tokens > 0

    status = producer(env, "status", result["id"], "--json")
    shown = json.loads(status.stdout)
    assert shown["state"] == "SUCCESS" and shown["tokens"] == tokens
    plain = producer(env, "status", result["id"])
    assert f"succeeded on {result['worker']}, {tokens} tokens" in plain.stdout
    assert "PROGRESS" not in plain.stdout + status.stdout


def test_cancel_of_a_finished_task_says_it_had_already_finished(env, images: Path):
    result = submitted_and_finished(env, images)
    done = producer(env, "cancel", result["id"])
    assert done.returncode == 1
    assert "had already finished (succeeded)" in done.stderr
    assert "cancel requested" not in done.stdout + done.stderr
    # and its result stands
    again = producer(env, "result", result["id"], "--json")
    assert json.loads(again.stdout)["state"] == "SUCCESS"


def test_a_closed_pipe_ends_quietly(env, images: Path):
    result = submitted_and_finished(env, images)
    reader, writer = os.pipe()
    os.close(reader)  # like `| head` that has already gone
    try:
        done = subprocess.run(
            [sys.executable, "-m", "producer.cli", "result", result["id"], "--json"],
            env=env, stdout=writer, stderr=subprocess.PIPE, text=True, timeout=120, check=False,
        )
    finally:
        os.close(writer)
    assert done.returncode == 141  # as a shell reports a process ended by SIGPIPE
    assert done.stderr == ""


def test_timeout_implies_waiting_and_is_refused_with_stream(env):
    nobody = {**env, "VQ_QUEUE": "nobody-listens"}
    queued = producer(nobody, "submit", "--task", "ask", "--prompt", "Hi")
    task_id = queued.stdout.strip()
    # `--timeout` alone waits (and gives up), never returns a queued status as if done
    waited = producer(nobody, "result", task_id, "--timeout", "1")
    assert waited.returncode == 4 and "did not finish" in waited.stderr
    refused = producer(nobody, "result", task_id, "--stream", "--timeout", "1")
    assert refused.returncode == 2 and "--timeout" in refused.stderr


def test_ctrl_c_while_waiting_exits_130_and_says_the_task_keeps_running(env, tmp_path: Path):
    # Given a wait on a queue that no worker consumes
    stderr_path = tmp_path / "stderr.txt"
    with stderr_path.open("w") as stderr:
        child = subprocess.Popen(
            [sys.executable, "-m", "producer.cli", "submit", "--task", "ask", "--prompt",
             "Count to ten.", "--wait"],
            # faulthandler: a child that does not exit is made to print where it hangs
            env={**env, "VQ_QUEUE": "nobody-listens", "PYTHONFAULTHANDLER": "1"},
            stdout=subprocess.PIPE, stderr=stderr, text=True,
        )
        try:
            # Then it says so once, on stderr, and keeps waiting
            deadline = time.monotonic() + 120
            while "no worker is consuming queue nobody-listens" not in stderr_path.read_text():
                assert child.poll() is None, stderr_path.read_text()
                assert time.monotonic() < deadline, "no warning about the missing worker"
                time.sleep(0.05)
            assert child.poll() is None
            # When the user presses Ctrl+C
            child.send_signal(signal.SIGINT)
            try:
                code = child.wait(timeout=60)
            except subprocess.TimeoutExpired as hung:
                child.send_signal(signal.SIGABRT)
                child.wait(timeout=30)
                said = stderr_path.read_text()
                raise AssertionError(f"still running 60 s after SIGINT:\n{said}") from hung
        finally:
            if child.poll() is None:
                child.kill()
    said = stderr_path.read_text()
    # Then it exits 130, without a traceback, and says how to cancel the task it left running
    assert code == 130, said
    assert "Traceback" not in said
    assert said.count("no worker is consuming queue") == 1
    task_id = said.split("interrupted: task ")[1].split()[0]
    assert f"`producer cancel {task_id}`" in said and "keeps running" in said


@pytest.mark.parametrize("password", ["", "not-the-password"], ids=["missing", "wrong"])
def test_a_missing_or_wrong_password_is_an_authentication_error(module_redis, password: str):
    url = module_redis.url.replace(f":{PASSWORD}@", f":{password}@" if password else "@")
    began = time.monotonic()
    done = producer(base_env(url), "status", "00000000-0000-4000-8000-000000000000")
    assert done.returncode == 3
    assert "authentication error" in done.stderr and "REDIS_URL" in done.stderr
    assert "unreachable" not in done.stderr
    assert "not-the-password" not in done.stderr
    assert time.monotonic() - began < 30  # refused at once, not after the retries


@pytest.mark.parametrize("command", ["submit", "status", "result", "cancel"])
def test_help_states_the_task_rules(env, command: str):
    done = producer(env, command, "--help")
    assert done.returncode == 0
    assert "describe  1 image; fixed prompt" in done.stdout
    assert "compare   2-8 images" in done.stdout
    assert "ask       0-8 images; needs --prompt" in done.stdout
    assert "up to 16 tokens" in done.stdout  # the caps this client enforces (base_env's)


def test_submit_priority_puts_the_task_on_that_list(module_redis):
    # A queue no worker consumes, so the message stays where the CLI put it.
    env = base_env(module_redis.url, VQ_QUEUE="cli-priority")
    admin = module_redis.client()
    done = producer(env, "submit", "--task", "ask", "--prompt", "Hi", "--priority", "high")
    assert done.returncode == 0, done.stderr
    [message] = admin.lrange("cli-priority.high", 0, -1)
    assert json.loads(message)["headers"]["id"] == done.stdout.strip()
    default = producer(env, "submit", "--task", "ask", "--prompt", "Hi")
    assert default.returncode == 0 and admin.llen("cli-priority") == 1
    refused = producer(env, "submit", "--task", "ask", "--prompt", "Hi", "--priority", "urgent")
    assert refused.returncode == 2
    assert "--priority" in refused.stderr and "invalid choice" in refused.stderr
    assert admin.llen("cli-priority.low") == 0 and admin.llen("cli-priority.high") == 1


# --- Choices and log probabilities (issue 22 item 4, issue 21 item 4) ------------------------

SAMPLED = ["--temperature", "1.0", "--seed", "5", "--max-new-tokens", "4"]


def asked(images: Path, *extra: str) -> list[str]:
    image = str(images / "small_400x300.jpg")
    return ["submit", "--task", "ask", "--prompt", "What is it?", "--image", image, *extra]


def test_submit_n_and_logprobs_show_every_choice_and_its_tokens_in_json(env, images: Path):
    # Given two sampled choices with logprobs and two alternatives per token
    wanted = ("--n", "2", "--logprobs", "2", "--wait", "--json")
    done = producer(env, *asked(images, *SAMPLED, *wanted))
    # Then --json shows both choices, each with its tokens' logprobs
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert [c["index"] for c in result["choices"]] == [0, 1]
    for choice in result["choices"]:
        assert 0 < len(choice["logprobs"]) <= choice["completion_tokens"]
        assert all(len(entry["top_logprobs"]) == 2 for entry in choice["logprobs"])
    assert result["logprobs"] == result["choices"][0]["logprobs"]
    # And --logprobs alone asks for no alternatives
    bare = producer(env, *asked(images, "--max-new-tokens", "3", "--logprobs", "--wait", "--json"))
    assert bare.returncode == 0, bare.stderr
    entries = json.loads(bare.stdout)["logprobs"]
    assert entries and all(entry["top_logprobs"] == [] for entry in entries)
    # And the plain output names each choice
    plain = producer(env, *asked(images, *SAMPLED, "--n", "2", "--wait"))
    assert plain.returncode == 0, plain.stderr
    assert [line[:10] for line in plain.stdout.splitlines()[:1]] == ["[choice 0]"]
    assert "[choice 1]" in plain.stdout


def test_a_streamed_task_with_choices_names_each_deltas_choice(env, images: Path):
    # Given a task with two choices streamed as JSON lines
    done = producer(env, *asked(images, *SAMPLED, "--n", "2", "--stream", "--json"))
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    # Then every delta names its choice, and each choice's deltas join to its text
    deltas = [line for line in lines if line["kind"] == "delta"]
    assert deltas and all(line["choice"] in (0, 1) for line in deltas)
    result = lines[-1]["result"]
    for choice in result["choices"]:
        text = "".join(line["text"] for line in deltas if line["choice"] == choice["index"])
        assert text == choice["text"]


@pytest.mark.parametrize(
    ("args", "named"),
    [(["--n", "9"], "--n"), (["--n", "x"], "--n"), (["--logprobs", "21"], "--logprobs")],
)
def test_n_and_logprobs_out_of_range_are_usage_errors(env, images: Path, module_redis, args, named):
    before = module_redis.client().llen("gpu")
    done = producer(env, *asked(images, *args))
    assert done.returncode == 2
    assert named in done.stderr
    assert module_redis.client().llen("gpu") == before


def test_every_option_of_every_command_has_help(env):
    from producer.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in commands.choices.items():
        for action in command._actions:
            assert action.help, f"producer {name} {action.option_strings or action.dest}"
    shown = producer(env, "submit", "--help").stdout
    assert "--n N" in shown and "--logprobs [K]" in shown

"""Log probabilities from the batched engine (tiny reference checkpoint, float32, CPU).

They are the distribution each token was chosen from at temperature 1 (log-softmax of
the model's logits over the tokens the request allows: a grammar's mask applied): under
greedy decoding the chosen token is the most likely one, the gaps between alternatives are
the reference's logit margins, and a row reports the same numbers alone and in a batch.
Rows that ask nothing get nothing.
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from support.reference import CASES, REFERENCE_DIR, TINY_MODEL, case_job, case_request
from support.stepped import stepped_scheduler, waiting_events

from worker.inference.engine import Engine, EngineConfig
from worker.inference.scheduler import Finished, Job, Scheduler, Token
from worker.model.steps import RowLogprobs

CASE = "img_640x480_png_c16"
TOLERANCE = 1e-4  # float32 logits, compared with the reference's recorded values


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.load(EngineConfig(model=str(TINY_MODEL), device="cpu", max_batch=4))


def scheduler_for(engine: Engine, decode_kernel: str = "rows") -> Scheduler:
    """A scheduler the test steps itself (the engine's own runs on its own thread)."""
    return stepped_scheduler(engine, max_rows=4, positions=8192, decode_kernel=decode_kernel)


@pytest.fixture(scope="module")
def host(engine: Engine) -> Scheduler:
    return scheduler_for(engine)


def run(scheduler: Scheduler, jobs: list[Job]) -> dict[Job, list[Token]]:
    """Step until every job ended; each job's Token events."""
    for job in jobs:
        scheduler.enqueue(job)
    tokens: dict[Job, list[Token]] = {job: [] for job in jobs}
    ended: set[Job] = set()
    for _ in range(2000):
        scheduler.step()
        for job in jobs:
            for event in waiting_events(job):
                if isinstance(event, Token):
                    tokens[job].append(event)
                else:
                    assert isinstance(event, Finished), event
                    ended.add(job)
        if len(ended) == len(jobs):
            return tokens
    raise AssertionError("the scheduler did not finish")


def asking(engine: Engine, case_id: str, top: int | None) -> Job:
    job = case_job(engine, case_id)
    job.logprobs = top
    return job


def test_under_greedy_the_chosen_token_is_the_most_likely_and_gaps_match_the_reference(
    engine: Engine, host: Scheduler,
) -> None:
    # Given a greedy job asking for 5 alternatives per token
    job = asking(engine, CASE, 5)
    # When it runs
    events = run(host, [job])[job]
    case = CASES[CASE]
    # Then it gets the reference's tokens, each with logprobs whose first alternative is
    # the token itself, at the top of a sorted list of 5
    assert [e.token_id for e in events] == case["generated_ids"]
    for step, event in zip(case["steps"], events, strict=False):
        chosen = event.logprobs
        assert isinstance(chosen, RowLogprobs)
        assert len(chosen.top) == 5
        assert chosen.top[0] == (event.token_id, chosen.logprob)
        values = [logprob for _, logprob in chosen.top]
        assert values == sorted(values, reverse=True)
        assert chosen.logprob <= 0.0
        assert sum(math.exp(v) for v in values) <= 1.0 + 1e-6
        # The runner-up and its gap are the reference's (logprob gaps are logit gaps)
        assert chosen.top[1][0] == step["runner_up"]
        assert chosen.top[0][1] - chosen.top[1][1] == pytest.approx(step["margin"], abs=TOLERANCE)
    # And the first step's ten most likely ids are the reference's, in its order
    first = run(host, [asking(engine, CASE, 10)])
    (top10,) = first.values()
    reference = case["first_step_logits"]
    assert top10[0].logprobs is not None
    assert [i for i, _ in top10[0].logprobs.top] == reference["top10_ids"]
    gaps = [v - reference["top10_values"][0] for v in reference["top10_values"]]
    ours = [v - top10[0].logprobs.top[0][1] for _, v in top10[0].logprobs.top]
    assert ours == pytest.approx(gaps, abs=TOLERANCE)


def test_the_chosen_logprob_is_the_maximum_of_the_log_softmax_of_the_reference_logits(
    engine: Engine, host: Scheduler,
) -> None:
    # Given the original model's first-step logits for a prompt (the reference set)
    logits = load_file(REFERENCE_DIR / "logits_step0.safetensors")[CASE].double()
    reference = torch.log_softmax(logits, dim=-1)
    # When the engine runs the prompt asking for logprobs and 20 alternatives
    job = asking(engine, CASE, 20)
    events = run(host, [job])[job]
    # Then the first token is the reference's argmax, its logprob the log-softmax's
    # maximum, and the alternatives the reference's 20 most likely, with their logprobs
    first = events[0].logprobs
    assert first is not None
    assert events[0].token_id == int(reference.argmax())
    assert first.logprob == pytest.approx(float(reference.max()), abs=TOLERANCE)
    values, ids = reference.topk(20)
    assert [i for i, _ in first.top] == ids.tolist()
    assert [v for _, v in first.top] == pytest.approx(values.tolist(), abs=TOLERANCE)


def test_logprobs_without_alternatives_carry_an_empty_list(engine: Engine, host: Scheduler) -> None:
    job = asking(engine, "text_only", 0)
    events = run(host, [job])[job]
    assert events and all(e.logprobs is not None and e.logprobs.top == () for e in events)


def test_a_row_reports_the_same_logprobs_alone_and_in_a_batch(
    engine: Engine, host: Scheduler
) -> None:
    # Given a job's logprobs when it runs alone
    alone = run(host, [asking(engine, CASE, 3)])
    (expected,) = alone.values()
    # When the same job shares its steps with two others (one asking, one not)
    job = asking(engine, CASE, 3)
    neighbours = [asking(engine, "two_images_c4", 20), asking(engine, "text_only", None)]
    together = run(host, [neighbours[0], job, neighbours[1]])
    # Then its tokens and logprobs are the same (exactly: CPU rows are row-independent)
    assert together[job] == expected
    assert all(event.logprobs is None for event in together[neighbours[1]])
    assert all(
        event.logprobs is not None and len(event.logprobs.top) == 20
        for event in together[neighbours[0]]
    )


def test_the_engine_reports_each_token_with_its_text_and_bytes(engine: Engine) -> None:
    # Given a request asking for 2 alternatives, and the same request without logprobs
    plain = engine.generate(case_request("text_eos_stop"))
    result = engine.generate(case_request("text_eos_stop", logprobs=2))
    # Then the text is unchanged, there is no list without the ask, and there is one
    # entry per generated token but the end token, in OpenAI's shape
    assert result.text == plain.text and plain.logprobs is None
    assert result.logprobs is not None
    stops = engine.processor.stop_token_ids
    kept = [t for t in result.token_ids if t not in stops]
    assert len(result.logprobs) == len(kept)
    for token_id, item in zip(kept, result.logprobs, strict=True):
        assert set(item) == {"token", "logprob", "bytes", "top_logprobs"}
        text, data = engine.vocabulary.piece(token_id)
        assert (item["token"], item["bytes"]) == (text, list(data))
        assert [alt["token"] for alt in item["top_logprobs"]][:1] == [text]
        assert len(item["top_logprobs"]) == 2
    joined = b"".join(bytes(item["bytes"]) for item in result.logprobs)
    assert joined.decode("utf-8", errors="replace").strip() == plain.text.strip()


def test_the_graph_paths_packed_copy_carries_the_same_logprobs(
    engine: Engine, host: Scheduler
) -> None:
    # Given the graph path's step (device-side choice, tokens and logprobs packed in one
    # tensor), run uncaptured on the CPU with the gather kernel
    graphed = scheduler_for(engine, "gather")
    # When a job asking for 4 alternatives runs there beside one that asks nothing
    job, other = asking(engine, CASE, 4), asking(engine, "text_only", None)
    events = run(graphed, [job, other])
    host = run(host, [asking(engine, CASE, 4)])
    (expected,) = host.values()
    # Then it reports the host path's tokens and logprobs (within float tolerance: the
    # batched logits), and the other row none
    assert [e.token_id for e in events[job]] == [e.token_id for e in expected]
    for got, want in zip(events[job], expected, strict=True):
        assert got.logprobs is not None and want.logprobs is not None
        assert [i for i, _ in got.logprobs.top] == [i for i, _ in want.logprobs.top]
        assert got.logprobs.logprob == pytest.approx(want.logprobs.logprob, abs=TOLERANCE)
    assert all(e.logprobs is None for e in events[other])


COLOUR = {
    "type": "json_schema",
    "json_schema": {"name": "colour", "strict": True, "schema": {
        "type": "object",
        "properties": {"colour": {"enum": ["red", "green", "blue"]}},
        "required": ["colour"],
        "additionalProperties": False,
    }},
}


@pytest.mark.parametrize("decode_kernel", ["rows", "gather"])
def test_under_a_grammar_logprobs_cover_the_allowed_tokens_and_greedy_picks_the_top(
    engine: Engine, decode_kernel: str
) -> None:
    # Given a greedy job constrained to {"colour": "red" | "green" | "blue"}, asking for 20
    # alternatives per token (the host path, and the graph path's packed copy)
    job = asking(engine, "text_only", 20)
    job.constraint = engine.grammars.constraint(COLOUR)
    # When it runs
    events = run(scheduler_for(engine, decode_kernel), [job])[job]
    # Then every token is the first of its alternatives (the distribution it was chosen
    # from: the grammar's mask applied), every alternative is finite, and where the
    # grammar allows fewer than 20 tokens the listed ones are all of them (they sum to 1)
    assert events
    narrowed = 0
    for event in events:
        chosen = event.logprobs
        assert chosen is not None
        assert chosen.top[0] == (event.token_id, chosen.logprob)
        assert all(math.isfinite(value) for _, value in chosen.top)
        if len(chosen.top) < 20:
            narrowed += 1
            assert sum(math.exp(value) for _, value in chosen.top) == pytest.approx(1.0)
    assert narrowed > 0

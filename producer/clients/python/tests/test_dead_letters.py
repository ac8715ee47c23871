"""Dead letters listed and replayed: as `llmq dlq replay` replays them (the same envelopes,
the same script), and on a real worker."""

from __future__ import annotations

import json
from typing import Any

import pytest

from llmq_client import Client, DeadLetter, NotFound, ReplayRefused
from llmq_client.keys import derive_id

from .conftest import answer, assert_sentence, env, unique

WAIT = 30.0


def letter_of(client: Client, task_id: str) -> DeadLetter:
    found = [d for d in client.dead_letters(1000) if d.task_id == task_id]
    assert len(found) == 1, found
    return found[0]


def test_a_dead_letter_is_listed_and_replayed_until_it_succeeds(client: Client) -> None:
    # `flaky` fails its first two calls: both tries of the task's one attempt.
    prompt = unique("Flaky")
    task_id = client.enqueue(prompt, model="flaky", max_attempts=1)
    assert client.wait(task_id, timeout=WAIT).status == "dead"
    letter = letter_of(client, task_id)
    assert (letter.queue, letter.error_class, letter.attempts) == (client.queue, "retryable", 1)
    assert letter.error.startswith("gave up after 1 attempt;") and letter.failed_at is not None
    assert letter.envelope is not None and letter.envelope["prompt"] == prompt and letter.chain_step is None

    assert client.replay(letter) == task_id
    # In one step: the letter is gone and the task is back (or already running again).
    assert client.redis.xrange(client.keys.dead, letter.id, letter.id) == []
    record = client.wait(task_id, timeout=WAIT)
    assert (record.status, record.output) == ("succeeded", answer(prompt, "flaky"))
    with pytest.raises(NotFound) as e:
        client.replay(letter)
    assert_sentence(e.value, f"dead letter {letter.id} is no longer in queue `{client.queue}`")


def test_a_replay_by_task_id_counts_the_replay_in_the_envelope(client: Client) -> None:
    task_id = client.enqueue(unique("Refused twice"), model="fail-400")
    assert client.wait(task_id, timeout=WAIT).status == "dead"
    first = letter_of(client, task_id)
    assert first.envelope is not None and "replays" not in first.envelope
    assert client.replay(task_id) == task_id

    # It runs again, fails again: a new letter whose envelope says it was replayed once.
    def replayed() -> list[DeadLetter]:
        return [d for d in client.dead_letters(1000) if d.task_id == task_id and d.id != first.id]

    record = client.wait(task_id, timeout=WAIT)
    assert record.status == "dead"
    again = replayed()
    assert len(again) == 1 and again[0].envelope is not None
    assert again[0].envelope["replays"] == 1 and again[0].envelope["attempts"] == 1
    # By dead-entry id, on another provider.
    assert client.replay(again[0].id, provider="mock") == task_id


def test_a_chain_steps_letter_is_left_to_the_llmq_binaries(client: Client) -> None:
    chain = client.submit_chain({"steps": [{"name": "only", "prompt": "Refused", "model": "fail-400"}]})
    end = client.wait_chain(chain, timeout=WAIT)
    letter = letter_of(client, end.steps["only"].task_id)
    assert letter.chain_step == (chain.chain_id, "only")
    with pytest.raises(ReplayRefused) as e:
        client.replay(letter)
    assert_sentence(
        e.value,
        f"`llmq dlq replay {letter.id} --queue {client.queue}`",
        f"`llmq chain retry {chain.chain_id} --from only --queue {client.queue}`",
    )
    assert letter_of(client, letter.task_id) == letter, "nothing was done"


def test_an_unknown_dead_letter_is_a_sentence(client: Client) -> None:
    for ident in ["1-1", "0b6f4c2e-8a57-4a43-9c3e-2f5d8e7a1b90"]:
        with pytest.raises(NotFound) as e:
            client.replay(ident)
        assert_sentence(e.value, f"no dead letter {ident} in queue `{client.queue}`")


def canonical(task: str, queue: str) -> Any:
    """A replayed task comparable across queues: parsed, with the id derived from the queue
    (the letter without one) named as such."""
    try:
        value = json.loads(task)
    except ValueError:
        return task
    if value.get("id") == derive_id(queue, "0-7"):
        value["id"] = "<derived from entry 0-7>"
    return value


def test_a_replay_enqueues_what_llmq_dlq_replay_enqueues() -> None:
    by_cli, by_client = env("LLMQ_REPLAY_CLI_QUEUE"), env("LLMQ_REPLAY_PY_QUEUE")
    with Client.from_url(env("REDIS_URL"), by_client) as client:
        letters = client.dead_letters()
        assert len(letters) == 4
        for letter in letters:
            client.redis.set(client.keys.result(letter.task_id), '{"status":"dead"}')
        assert {d.task_id for d in letters} >= {
            "5c2f1d9e-0b7a-4f3b-9c1d-2e3f4a5b6c7d",
            derive_id(by_client, "0-7"),
        }
        for letter in letters:
            assert client.replay(letter, provider="mock") == letter.task_id
            assert client.redis.exists(client.keys.result(letter.task_id)) == 0, "its record is deleted"
        assert client.dead_letters() == []
        mine = [
            canonical(fields[b"task"].decode(), by_client)
            for _, fields in client.redis.xrange(client.keys.stream)
        ]
        theirs = [
            canonical(fields[b"task"].decode(), by_cli)
            for _, fields in client.redis.xrange(f"llmq:{{{by_cli}}}:stream")
        ]
    assert sorted(json.dumps(t, sort_keys=True) for t in mine) == sorted(
        json.dumps(t, sort_keys=True) for t in theirs
    )
    full = next(t for t in mine if isinstance(t, dict) and t["prompt"] == "replay me")
    assert (full["replays"], full["provider"], full["id"]) == (
        2,
        "mock",
        "5c2f1d9e-0b7a-4f3b-9c1d-2e3f4a5b6c7d",
    )
    assert not {"attempts", "snoozes", "waiting_since", "last_error"} & set(full)
    assert "not json {" in mine, "a payload that is not an envelope is replayed as it came"

"""Dead letters listed and replayed: as `llmq dlq replay` replays them (the same envelopes,
the same script), and on a real worker."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from llmq_client import Client, DeadLetter, InvalidArgument, InvalidRecord, NotFound, ReplayRefused
from llmq_client.keys import derive_id, parse_uuid

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
    """A replayed task comparable across queues: parsed, with an id derived from the queue
    (a letter without one) named as such; what Python does not parse, as it is."""
    try:
        value = json.loads(task)
    except (ValueError, RecursionError):
        return task
    for entry_id in ("0-7", "0-17", "0-19", "0-20"):
        if isinstance(value, dict) and value.get("id") == derive_id(queue, entry_id):
            value["id"] = f"<derived from entry {entry_id}>"
    return value


def test_a_replay_enqueues_what_llmq_dlq_replay_enqueues() -> None:
    by_cli, by_client = env("LLMQ_REPLAY_CLI_QUEUE"), env("LLMQ_REPLAY_PY_QUEUE")
    with Client.from_url(env("REDIS_URL"), by_client) as client:
        letters = client.dead_letters()
        assert len(letters) == 15
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
    # What only Rust's parsers decide, decided alike (the comparison above says so; these
    # say what it was).
    year_one = next(t for t in mine if isinstance(t, dict) and t["prompt"] == "year one")
    assert (year_one["id"], year_one["run_at"], year_one["prompt_cache"]) == (
        "7d1e2f3a-4b5c-4d6e-8f70-8192a3b4c5d6",
        "0000-12-31T23:00:00Z",
        False,
    )
    top = next(t for t in mine if isinstance(t, dict) and t["prompt"] == "f32 max")
    assert top["temperature"] == 3.4028235e38  # the shortest decimal of the largest f32
    last = next(t for t in mine if isinstance(t, dict) and t["prompt"] == "last counts")
    assert (last["metadata"], last["extra"]) == ({"a": 2}, {"b": [2]})
    as_they_came = [t for t in mine if isinstance(t, str) or "replays" not in t]
    assert len(as_they_came) == 9, as_they_came


# Spellings of an id (given as a function of a fresh UUID), each written raw as a task's `id`.
SPELLINGS: list[tuple[str, Callable[[uuid.UUID], str]]] = [
    ("simple", lambda u: u.hex),
    ("simple upper case", lambda u: u.hex.upper()),
    ("hyphenated", str),
    ("hyphenated upper case", lambda u: str(u).upper()),
    ("braced", lambda u: "{" + str(u) + "}"),
    ("urn", lambda u: f"urn:uuid:{u}"),
    ("urn upper case", lambda u: f"URN:UUID:{u}"),
    ("braced simple", lambda u: "{" + u.hex + "}"),
    ("urn simple", lambda u: f"urn:uuid:{u.hex}"),
    ("urn braced", lambda u: "urn:uuid:{" + str(u) + "}"),
    ("newline after", lambda u: f"{u}\n"),
    ("space before", lambda u: f" {u}"),
    ("hyphen out of place", lambda u: str(u)[:8] + str(u)[9] + "-" + str(u)[10:]),
]


def test_every_spelling_of_an_id_names_the_task_the_worker_names(client: Client) -> None:
    """Each spelling, written raw, is run by a real worker: the client reads the same task id
    from it as the worker (the UUID, or, for a spelling the worker refuses, the id derived from
    the entry), so a replay deletes that task's record and no other's."""
    written = []
    for name, spell in SPELLINGS:
        payload = json.dumps({"v": 1, "id": spell(uuid.uuid4()), "prompt": unique(name), "model": "fail-400"})
        entry_id = client.redis.xadd(client.keys.stream, {"task": payload}).decode()
        parsed = parse_uuid(json.loads(payload)["id"])
        written.append((name, entry_id, str(parsed) if parsed else derive_id(client.queue, entry_id)))
    records = client.wait_all([task_id for _, _, task_id in written], timeout=WAIT)
    letters = {d.entry_id: d for d in client.dead_letters(1000)}
    for (name, entry_id, task_id), record in zip(written, records, strict=True):
        # A spelling the worker takes runs (and is refused by the provider); another makes the
        # envelope invalid.
        taken = name in (
            "simple",
            "simple upper case",
            "hyphenated",
            "hyphenated upper case",
            "braced",
            "urn",
            "urn upper case",
        )
        assert (record.task_id, record.error_class) == (task_id, "fatal" if taken else "invalid"), name
        assert letters[entry_id].task_id == task_id, name


def write_letter(client: Client, task: str, **fields: str) -> str:
    """A dead letter as a worker writes one (fields given replace its own)."""
    entry = {
        "task": task,
        "error": "gave up",
        "class": "retryable",
        "attempts": "1",
        "failed_at": "1700000000000",
        "entry_id": "1-0",
        **fields,
    }
    return str(client.redis.xadd(client.keys.dead, entry).decode())


def test_hostile_dead_letters_are_listed_and_replayed_as_llmq_dlq_replay_does(idle: Client) -> None:
    deep = '{"v":1,"prompt":"deep","metadata":' + "[" * 200_000 + "]" * 200_000 + "}"
    plain = str(uuid.uuid4())
    ids = {
        "deep": write_letter(idle, deep),
        "newline id": write_letter(
            idle, json.dumps({"v": 1, "id": plain + "\n", "prompt": "x"}), entry_id="2-0"
        ),
        "year 1": write_letter(
            idle,
            json.dumps(
                {
                    "v": 1,
                    "id": plain,
                    "prompt": "x",
                    "run_at": "0001-01-01T00:00:00+01:00",
                    "temperature": 0.1,
                }
            ),
            failed_at="99999999999999999999",
            attempts="\u00b2",
        ),
        "surrogate": write_letter(
            idle, '{"v":1,"prompt":"x","metadata":"\\ud800"}', entry_id="3-0", failed_at="9223372036854775807"
        ),
        "array": write_letter(idle, '["chain-1", "step-a"]', entry_id="4-0"),
        "beyond f32": write_letter(idle, '{"v":1,"prompt":"x","temperature":1e39}', entry_id="5-0"),
    }
    letters = {d.id: d for d in idle.dead_letters()}
    assert set(letters) == set(ids.values()), "every letter is listed, none breaks the listing"
    deep_letter = letters[ids["deep"]]
    assert (deep_letter.task_id, deep_letter.envelope, deep_letter.chain_step) == (
        derive_id(idle.queue, "1-0"),
        None,
        None,
    )
    assert letters[ids["newline id"]].task_id == derive_id(idle.queue, "2-0")
    odd = letters[ids["year 1"]]
    assert (odd.task_id, odd.failed_at, odd.attempts) == (plain, None, 0)
    assert letters[ids["surrogate"]].envelope is None and letters[ids["surrogate"]].failed_at is None
    with pytest.raises(ReplayRefused) as refused:
        idle.replay(letters[ids["array"]])
    assert_sentence(refused.value, "step `step-a` of chain chain-1")

    for name in ("deep", "newline id", "year 1", "surrogate", "beyond f32"):
        assert idle.replay(ids[name]) == letters[ids[name]].task_id, name
    replayed = [fields[b"task"].decode() for _, fields in idle.redis.xrange(idle.keys.stream)]
    assert replayed[0] == deep and replayed[1] == letters[ids["newline id"]].task
    assert json.loads(replayed[2]) == {
        "v": 1,
        "id": plain,
        "prompt": "x",
        "run_at": "0000-12-31T23:00:00Z",
        "temperature": 0.1,
        "replays": 1,
    }
    assert replayed[3:] == [
        '{"v":1,"prompt":"x","metadata":"\\ud800"}',
        '{"v":1,"prompt":"x","temperature":1e39}',
    ]


def test_dead_letters_are_read_a_page_at_a_time_and_at_most_1000_a_call(idle: Client) -> None:
    written = [write_letter(idle, json.dumps({"v": 1, "prompt": f"letter {i}"})) for i in range(250)]
    counts: list[int] = []
    execute = idle.redis.execute_command

    def counted(*args: Any, **kwargs: Any) -> Any:
        if args[0] == "XREVRANGE":
            counts.append(int(args[args.index("COUNT") + 1]))
        return execute(*args, **kwargs)

    idle.redis.execute_command = counted
    newest = idle.dead_letters(250)
    assert [d.id for d in newest] == written[::-1]
    assert counts == [100, 100, 50], "each read is one page of at most 100 letters"
    counts.clear()
    older = idle.dead_letters(1000, before=newest[99].id)
    assert [d.id for d in older] == written[::-1][100:] and counts == [100, 100]
    for limit in (0, 1001, 10**9):
        with pytest.raises(InvalidArgument) as e:
            idle.dead_letters(limit)
        assert_sentence(e.value, "limit must be a whole number from 1 to 1000", "before=")
    with pytest.raises(InvalidArgument) as e:
        idle.dead_letters(10, before="newest")
    assert_sentence(e.value, "before must be a dead letter's id")


def test_a_record_llmq_did_not_write_is_a_sentence(idle: Client) -> None:
    task_id = str(uuid.uuid4())
    for raw in ["not json", "[" * 100_000, '{"status": "succeeded"}']:
        idle.redis.set(idle.keys.result(task_id), raw)
        calls: list[Callable[[], object]] = [
            lambda: idle.result(task_id),
            lambda: idle.wait(task_id, timeout=1),
        ]
        for call in calls:
            with pytest.raises(InvalidRecord) as e:
                call()
            assert_sentence(e.value, f"the result record of task {task_id}")

"""What the client reads and writes, checked without Redis: ids, durations and times spelled
as the Rust side spells them, JSON as serde_json reads it, hostile dead letters and records,
replays, the pauses of wait() and follow_chain(), and deps.sh. What a worker makes of the same
text is checked against real workers in the other files."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from llmq_client import InvalidChain, InvalidRecord, InvalidTask, TaskRecord, WaitTimeout, plans, wirejson
from llmq_client import envelope as E
from llmq_client.chain import build as build_chain
from llmq_client.chain import references
from llmq_client.keys import Keys, chain_key_id, derive_id, parse_uuid
from llmq_client.records import dead_letter

from .conftest import assert_sentence

U = "0b6f4c2e-8a57-4a43-9c3e-2f5d8e7a1b90"
H = U.replace("-", "")

# Every spelling Rust's uuid crate (Uuid::parse_str) takes, and spellings it refuses.
UUID_TAKEN = [
    H,
    H.upper(),
    U,
    U.upper(),
    "{" + U + "}",
    "{" + U.upper() + "}",
    "urn:uuid:" + U,
    "URN:UUID:" + U,
    "Urn:Uuid:" + U.upper(),
]
UUID_REFUSED = [
    "{" + H + "}",
    "urn:uuid:" + H,
    "urn:uuid:{" + U + "}",
    "{urn:uuid:" + U + "}",
    U + "\n",
    H + "\n",
    "\n" + U,
    " " + U,
    U + " ",
    "{" + U,
    U + "}",
    U[:13] + U[14:],  # a hyphen missing
    "0b6f4c2e8-a57-4a43-9c3e-2f5d8e7a1b90",  # 36 characters, a hyphen out of place
    "0b6f-4c2e-8a57-4a43-9c3e2f5d8e7a1b90",
    U[:-1] + "g",
    "urn:uuix:" + U,
    "urn:uuid" + U + "x",
    "\uff10" + U[1:],  # a fullwidth digit
    "",
    U + "-",
    "u" * 36,
]


@pytest.mark.parametrize("spelling", UUID_TAKEN)
def test_a_uuid_spelling_rust_takes_is_taken(spelling: str) -> None:
    assert parse_uuid(spelling) == uuid.UUID(U)


@pytest.mark.parametrize("spelling", UUID_REFUSED)
def test_a_uuid_spelling_rust_refuses_is_refused(spelling: str) -> None:
    assert parse_uuid(spelling) is None
    # A dead letter naming it is the task whose id derives from its entry, as the worker says.
    letter = dead_letter("q", ("5-0", {"task": json.dumps({"v": 1, "id": spelling}), "entry_id": "1-0"}))
    assert letter.task_id == derive_id("q", "1-0")
    with pytest.raises(InvalidTask):
        E.build({"prompt": "x", "task_id": spelling})


# humantime::parse_duration (2.4): (text, seconds, nanoseconds) it reads.
DURATIONS = [
    ("0", 0, 0),
    ("24h", 86400, 0),
    ("1h 30m", 5400, 0),
    ("1h30m", 5400, 0),
    ("1.5h", 5400, 0),
    ("1.5d", 129600, 0),
    ("2M", 2 * 2_630_016, 0),
    ("1y", 31_557_600, 0),
    ("1year 2months", 31_557_600 + 2 * 2_630_016, 0),
    ("1500ms", 1, 500_000_000),
    ("86400000ms", 86400, 0),
    ("3ns", 0, 3),
    ("7us", 0, 7000),
    ("7\u00b5s", 0, 7000),
    ("1 2h", 12 * 3600, 0),  # humantime skips spaces between digits
    ("  5 min  ", 300, 0),
    ("0.000000001s", 0, 1),
    ("1.05s", 1, 50_000_000),
    ("2wks", 14 * 86400, 0),
]
DURATIONS_REFUSED = [
    ("", "value was empty"),
    ("   ", "value was empty"),
    ("soon", "expected number at 0"),
    ("5", "time unit needed, for example 5sec or 5ms"),
    ("1.5", "time unit needed, for example 1sec or 1ms"),
    ("3 fortnights", 'unknown time unit "fortnights"'),
    ("1.h", "invalid character at 1"),
    ("-1h", "expected number at 0"),
    ("1h!", "invalid character at 2"),
    ("1.5ns", "number is too large"),
    ("0.0001h", "number is too large"),  # 0.36s is not whole seconds of an hour's fraction
    ("99999999999999999999s", "number is too large"),
]


@pytest.mark.parametrize(("text", "secs", "nanos"), DURATIONS)
def test_a_duration_humantime_reads_is_read_alike(text: str, secs: int, nanos: int) -> None:
    assert E.parse_duration(text) == (secs, nanos)


@pytest.mark.parametrize(("text", "says"), DURATIONS_REFUSED)
def test_a_duration_humantime_refuses_is_refused_in_its_words(text: str, says: str) -> None:
    with pytest.raises(E.DurationError) as e:
        E.parse_duration(text)
    assert says in str(e.value)


@pytest.mark.parametrize("deadline", ["1.5d", "720h", "0.5M", "86400000ms", "1w", "2592000s"])
def test_deadlines_in_any_unit_the_worker_reads_are_taken(deadline: str) -> None:
    assert E.build({"prompt": "x", "deadline": deadline})[1]["deadline"] == deadline


def test_a_chain_step_timeout_in_milliseconds_is_taken() -> None:
    spec = {"steps": [{"name": "a", "prompt": "x", "timeout": "1500ms"}]}
    assert build_chain(spec, None, 1 << 20, "q")[0]


@pytest.mark.parametrize(
    ("given", "utc"),
    [
        ("0001-01-01T00:00:00+01:00", "0000-12-31T23:00:00Z"),
        ("9999-12-31T23:30:00-02:00", "+10000-01-01T01:30:00Z"),
        ("2020-01-02T05:04:05.120+02:00", "2020-01-02T03:04:05.120Z"),
        ("2000-03-01T00:30:00+01:00", "2000-02-29T23:30:00Z"),
        ("2030-01-02 03:04:05.000001z", "2030-01-02T03:04:05.000001Z"),
    ],
)
def test_a_time_near_the_ends_of_the_calendar_is_read_as_chrono_reads_it(given: str, utc: str) -> None:
    assert E._utc(given) == utc
    _, env = E.build({"prompt": "x", "run_at": given})
    assert env["run_at"] == given
    replayed = json.loads(E.replayed_task(json.dumps({"v": 1, "prompt": "x", "run_at": given}), U, None))
    assert replayed["run_at"] == utc


def test_a_datetime_in_year_1_east_of_utc_is_written_as_year_0() -> None:
    early = datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=1)))
    assert E.build({"prompt": "x", "run_at": early})[1]["run_at"] == "0000-12-31T23:00:00Z"
    with pytest.raises(InvalidTask) as e:
        E.build({"prompt": "x", "run_at": datetime(2030, 1, 1, tzinfo=timezone(timedelta(seconds=30)))})
    assert_sentence(e.value, "field `run_at` is wrong", "not whole minutes")


def nested(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value


@pytest.mark.parametrize("levels", [127, 128, 1000, 200_000])
def test_metadata_nested_deeper_than_a_worker_reads_is_a_sentence(levels: int) -> None:
    for field in ("metadata",):
        with pytest.raises(InvalidTask) as e:
            E.build({"prompt": "x", field: {"a": nested(levels - 1)}})
        assert_sentence(
            e.value, f"field `{field}` is wrong: nests arrays and objects deeper than a worker reads"
        )
    params = {"type": "object", "properties": nested(levels)}
    with pytest.raises(InvalidTask) as e:
        E.build({"prompt": "x", "tools": [{"name": "t", "parameters": params}]})
    assert_sentence(e.value, "field `tools` is wrong: nests arrays and objects deeper")
    schema = {"type": "json_schema", "schema": {"x": nested(levels)}}
    with pytest.raises(InvalidTask) as e:
        E.build({"prompt": "x", "response_format": schema})
    assert_sentence(e.value, "field `response_format` is wrong: nests arrays and objects deeper")
    with pytest.raises(InvalidChain) as chain_error:
        build_chain(
            {"steps": [{"name": "a", "prompt": "x", "tools": [{"name": "t", "parameters": params}]}]},
            None,
            1 << 30,
            "q",
        )
    assert_sentence(chain_error.value, "nests arrays and objects deeper than a worker reads")


def test_metadata_as_deep_as_a_worker_reads_is_taken() -> None:
    # 126 levels in the field, 127 with the envelope: serde_json's most.
    _, env = E.build({"prompt": "x", "metadata": nested(126)})
    assert wirejson.depth(E.encode(env, 1 << 20)) == 127


def test_json_is_read_as_serde_json_reads_it() -> None:
    for text in [
        "[" * 128 + "]" * 128,
        "[" * 200_000 + "]" * 200_000,
        "NaN",
        '{"t": Infinity}',
        "1e400",
        "1" * 5000,
        '"\\ud800"',
        '{"\\udc00": 1}',
        "",
        "{",
    ]:
        with pytest.raises(ValueError):
            wirejson.loads(text)
    assert wirejson.loads("[" * 127 + "]" * 127) is not None
    assert wirejson.loads('"\\ud83d\\ude00 [[["') == "\U0001f600 [[["
    assert wirejson.loads("18446744073709551616") == 18446744073709551616.0  # beyond u64: a float
    assert wirejson.depth('{"a": "[[[[{{", "b": [["\\"]"]]}') == 3


def test_replays_of_values_rust_cannot_hold_are_what_llmq_dlq_replay_writes() -> None:
    # One more, saturating at the u32 maximum as `llmq dlq replay` does.
    out = json.loads(E.replayed_task(json.dumps({"v": 1, "prompt": "x", "replays": 4294967295}), U, None))
    assert out["replays"] == 4294967295
    assert (
        json.loads(E.replayed_task(json.dumps({"v": 1, "prompt": "x", "replays": 7}), U, None))["replays"]
        == 8
    )
    # The largest 32-bit float is kept, as its shortest decimal; a temperature beyond it is
    # one serde_json refuses, so the payload is replayed as it came, never with Infinity.
    top = json.loads(E.replayed_task('{"v":1,"prompt":"x","temperature":3.4028235e38}', U, None))
    assert top["temperature"] == 3.4028235e38  # the shortest decimal of the largest f32
    for huge in ("1e39", "-3.5e38"):
        task = '{"v":1,"prompt":"x","temperature":' + huge + "}"
        assert E.replayed_task(task, U, None) == task


@pytest.mark.parametrize(
    "task",
    [
        '{"v":1,"prompt":"x","prompt":"y"}',  # a field twice: serde refuses the envelope
        '{"v":1,"prompt":"x","messages":[{"role":"user","role":"user","content":"hi"}]}',
        '{"v":1,"prompt":"x","metadata":{"a":"\\ud800"}}',
        '{"v":1,"prompt":"x","metadata":1e400}',
        '{"v":1,"prompt":"x","metadata":' + "[" * 127 + "]" * 127 + "}",
        '{"v":1,"prompt":"x","metadata":' + "[" * 200_000 + "]" * 200_000 + "}",
        '{"v":1,"id":"' + U + '\\n","prompt":"x"}',
    ],
)
def test_a_payload_the_worker_cannot_read_is_replayed_as_it_came(task: str) -> None:
    assert E.replayed_task(task, U, "mock") == task


def test_repeated_free_json_keeps_the_last_value_as_serde_json_does() -> None:
    out = json.loads(E.replayed_task('{"v":1,"prompt":"x","metadata":{"a":1,"a":2},"extra":3}', U, None))
    assert out["metadata"] == {"a": 2} and out["extra"] == 3 and out["replays"] == 1


HOSTILE_LETTERS: list[tuple[dict[str, str], dict[str, Any]]] = [
    (
        {"task": '{"v":1,"metadata":' + "[" * 200_000 + "]" * 200_000 + "}"},
        {"envelope": None, "task_id": derive_id("q", "1-0")},
    ),
    ({"task": '{"v":1,"id":"' + U + '\\n"}'}, {"task_id": derive_id("q", "1-0")}),
    ({"task": '{"v":1,"id":"URN:UUID:' + U.upper() + '"}'}, {"task_id": U}),
    ({"task": '["chain-1","step-a"]'}, {"chain_step": ("chain-1", "step-a")}),
    ({"task": '{"chain_id":"c","step":"s","step":"t"}'}, {"chain_step": None}),
    ({"task": '{"chain_id":"c","step":"\\ud800"}'}, {"chain_step": None, "envelope": None}),
    ({"failed_at": "99999999999999999999"}, {"failed_at": None}),
    ({"failed_at": "9223372036854775807"}, {"failed_at": None}),
    ({"failed_at": "-9223372036854775808"}, {"failed_at": None}),
    ({"failed_at": "+1000"}, {"failed_at": datetime(1970, 1, 1, 0, 0, 1, tzinfo=timezone.utc)}),
    ({"failed_at": "1.5"}, {"failed_at": None}),
    ({"failed_at": "\u0661\u0662"}, {"failed_at": None}),  # Arabic-Indic digits: not Rust's
    ({"attempts": "\u00b2"}, {"attempts": 0}),
    ({"attempts": "+3"}, {"attempts": 3}),
    ({"attempts": "-1"}, {"attempts": 0}),
    ({"attempts": "18446744073709551616"}, {"attempts": 0}),
    ({"attempts": "18446744073709551615"}, {"attempts": 18446744073709551615}),
]


@pytest.mark.parametrize(("fields", "reads"), HOSTILE_LETTERS)
def test_a_hostile_dead_letter_is_read_as_the_binaries_read_it(
    fields: dict[str, str], reads: dict[str, Any]
) -> None:
    letter = dead_letter("q", ("5-0", {"entry_id": "1-0", **fields}))
    for name, value in reads.items():
        assert getattr(letter, name) == value, name


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ("not json", "the result record of task {id} is not JSON"),
        ("[1, 2]", "the result record of task {id} is JSON an array, not an object"),
        ('{"status": "succeeded"}', "the result record of task {id} has no `task_id` text"),
        ('{"task_id": 1, "queue": "q", "status": "dead"}', "has no `task_id` text"),
        ("[" * 100_000, "the result record of task {id} is not JSON"),
        (b"\xff\xfe", "is not JSON"),
    ],
)
def test_a_record_llmq_did_not_write_is_a_sentence(raw: Any, says: str) -> None:
    with pytest.raises(InvalidRecord) as e:
        TaskRecord.parse(raw, U)
    assert_sentence(e.value, says.format(id=U), "delete the key")


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def test_wait_sleeps_no_longer_than_the_time_left(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(plans, "time", clock)
    plan = plans.wait(Keys("q"), [U], timeout=0.25, poll=10.0)
    assert isinstance(next(plan), plans.Command)
    assert plan.send([None]) == plans.Sleep(0.25)
    clock.now += 0.25
    assert isinstance(plan.send(None), plans.Command)
    with pytest.raises(WaitTimeout):
        plan.send([None])


def test_follow_chain_sleeps_no_longer_than_the_time_left(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(plans, "time", clock)
    plan = plans.follow_chain(Keys("q"), "c", timeout=1.0, poll=5.0)
    assert isinstance(next(plan), plans.Pipeline)
    clock.now += 0.75
    assert plan.send([None, {}, None]) == plans.Sleep(0.25)
    clock.now += 0.25
    assert isinstance(plan.send(None), plans.Pipeline)
    with pytest.raises(WaitTimeout):
        plan.send([None, {}, None])


def test_a_chain_state_llmq_did_not_write_is_a_sentence() -> None:
    plan = plans.follow_chain(Keys("q"), "c", timeout=1.0, poll=5.0)
    next(plan)
    with pytest.raises(InvalidRecord) as e:
        plan.send([b"running", {b"a": b"[" * 100_000}, None])
    assert_sentence(e.value, "the state of step `a` of chain c is not JSON", "llmq chain show c")
    plan = plans.follow_chain(Keys("q"), "c", timeout=1.0, poll=5.0)
    next(plan)
    with pytest.raises(InvalidRecord) as e:
        plan.send([b"running", {}, b"[1]"])
    assert_sentence(e.value, "the spec of chain c is JSON an array, not an object")
    # Fields of the wrong type read as left out; a task id that is no UUID names no record.
    plan = plans.follow_chain(Keys("q"), "c", timeout=1.0, poll=5.0)
    next(plan)
    state = {"status": "succeeded", "round": "x", "task_id": "nope", "cost_usd": [1], "model": 7}
    end = plan.send([b"succeeded", {b"a": json.dumps(state).encode()}, None])
    assert isinstance(end, plans.Emit)
    step = end.value
    assert (step.round, step.task_id, step.cost_usd, step.model, step.record) == (0, "nope", 0.0, None, None)


def test_prompt_cache_is_a_boolean_field() -> None:
    assert E.build({"prompt": "x", "prompt_cache": False})[1]["prompt_cache"] is False
    assert "prompt_cache" not in E.build({"prompt": "x", "prompt_cache": None})[1]
    with pytest.raises(InvalidTask) as e:
        E.build({"prompt": "x", "prompt_cache": "no"})
    assert_sentence(e.value, "field `prompt_cache` is wrong: must be true or false")
    assert (
        E.replayed_task('{"v":1,"prompt":"x","prompt_cache":1}', U, None)
        == '{"v":1,"prompt":"x","prompt_cache":1}'
    )


def test_references_are_found_as_the_worker_finds_them() -> None:
    assert [r for _, _, r in references("{{a}} {{ b.output }} {{c.json.x.0}} {{d.summary}} {{e.json}}")] == [
        ("var", "a"),
        ("output", "b"),
        ("json", "c", "x", "0"),
        ("summary", "d"),
        ("json", "e"),
    ]
    assert references("{{a b}} {{}} {{x.json.}} {{{a}}") == []
    assert references("{{a") == []


def test_a_surrogate_anywhere_is_a_sentence_not_a_traceback() -> None:
    from llmq_client import BadRedisUrl, Client, InvalidId, InvalidQueue

    with pytest.raises(InvalidQueue):
        Keys("q\ud800")
    with pytest.raises(BadRedisUrl):
        Client.from_url("redis://h\ud800:1", "q")
    with pytest.raises(InvalidId):
        Keys("q").chain("c\udc00")
    with pytest.raises(InvalidTask):
        E.build_batch([{"prompt": "x\ud800"}], 1 << 20)
    with pytest.raises(InvalidChain):
        build_chain({"steps": [{"name": "a", "prompt": "x\ud800"}]}, None, 1 << 20, "q")


def written(**task: Any) -> str:
    """The ``task`` field the client writes for ``task`` (fixed id and time: comparable)."""
    _, env = E.build({"prompt": "x", "task_id": U, "enqueued_at": "2030-01-02T03:04:05Z", **task})
    return E.encode(env, E.DEFAULT_MAX_PAYLOAD_BYTES)


def test_a_cached_task_is_written_as_the_worker_writes_cache() -> None:
    head = f'{{"v":1,"prompt":"x","id":"{U}","enqueued_at":"2030-01-02T03:04:05Z"'
    assert written(cache={"ttl": "24h"}, temperature=0) == head + ',"cache":{"ttl":"24h"},"temperature":0}'
    assert written(cache=False) == head + ',"cache":false}'
    assert "cache" not in json.loads(written(cache=None))
    # As serde writes CacheKeep: ttl first, sampled only when true; a timedelta as seconds.
    assert json.loads(written(cache={"sampled": False, "ttl": "24h"}, temperature=0))["cache"] == {
        "ttl": "24h"
    }
    assert '"cache":{"ttl":"1h","sampled":true}' in written(cache={"sampled": True, "ttl": "1h"})
    assert json.loads(written(cache={"ttl": timedelta(hours=24)}, temperature=0))["cache"] == {
        "ttl": "86400s"
    }
    # Taken as the worker takes them: the ends of the range, any humantime spelling, a
    # temperature that is 0 (or below) as the worker's 32-bit float holds it.
    for ttl in ("1s", "1000ms", "30d", "720h", "2592000s", "1h 30m", "1.5d"):
        written(cache={"ttl": ttl}, temperature=0)
    for temperature in (0, 0.0, -0.0, -0.5, 1e-46):
        written(cache={"ttl": "10m"}, temperature=temperature)
    written(cache={"ttl": "10m", "sampled": True}, temperature=1.5)
    written(cache=False, stream=True)


SAMPLED = (
    "field `cache` is wrong: would give every identical request one sampled answer (temperature is "
    'unset or above 0); set "temperature": 0, or "sampled": true in cache to keep one sample.'
)
CACHE_REFUSED: list[tuple[dict[str, Any], str]] = [
    # CacheAsk::check, in its words and order.
    ({"cache": True}, 'field `cache` is wrong: true needs a time to keep the answer; write {"ttl": "24h"}.'),
    ({"cache": True, "stream": True, "temperature": 0.7}, "true needs a time to keep the answer"),
    ({"cache": {"ttl": "soon"}, "temperature": 0}, 'field `cache.ttl` is wrong: `soon` is not a duration (expected number at 0); write it as e.g. "10m" or "24h".'),
    ({"cache": {"ttl": "1 d 2"}}, 'field `cache.ttl` is wrong: `1 d 2` is not a duration (time unit needed, for example 2sec or 2ms); write it as e.g. "10m" or "24h".'),
    ({"cache": {"ttl": "1" * 50 + "x"}}, "field `cache.ttl` is wrong: `" + "1" * 40 + "\u2026` is not a duration ("),
    ({"cache": {"ttl": "0.5s"}, "temperature": 0}, 'field `cache.ttl` is wrong: 0.5s is not between 1s and 30d; give e.g. "24h".'),
    ({"cache": {"ttl": "0"}, "temperature": 0}, 'field `cache.ttl` is wrong: 0 is not between 1s and 30d; give e.g. "24h".'),
    ({"cache": {"ttl": "31d"}, "temperature": 0}, 'field `cache.ttl` is wrong: 31d is not between 1s and 30d; give e.g. "24h".'),
    ({"cache": {"ttl": "2592000.000000001s"}}, "field `cache.ttl` is wrong: 2592000.000000001s is not between 1s and 30d"),
    ({"cache": {"ttl": "24h"}, "temperature": 0, "stream": True}, "field `cache` is wrong: cannot be used with stream: a cached answer is not streamed; drop one of them."),
    ({"cache": {"ttl": "24h"}, "stream": True}, "field `cache` is wrong: cannot be used with stream"),
    ({"cache": {"ttl": "24h"}}, SAMPLED),
    ({"cache": {"ttl": "24h"}, "temperature": 0.7}, SAMPLED),
    ({"cache": {"ttl": "24h"}, "temperature": 1e-45}, SAMPLED),
    ({"cache": {"ttl": "24h", "sampled": False}, "temperature": 1}, SAMPLED),
    # Envelope::check's order: stream with tools and deadline before cache, NUL checks after.
    ({"cache": True, "stream": True, "tools": [{"name": "t"}]}, "field `stream` is wrong: cannot be used with tools"),
    ({"cache": True, "deadline": "2h"}, "field `deadline` is wrong: 2h is shorter than the 24h"),
    ({"cache": True, "model": "a\u0000b"}, "field `cache` is wrong: true needs"),
    # Its shape, which serde refuses before any check.
    ({"cache": {"ttl": "24h", "keep": "1h"}, "temperature": 0}, "field `cache` is wrong: has an unknown field `keep`; use only ttl, sampled."),
    ({"cache": {}}, "field `cache` is wrong: needs the field `ttl`."),
    ({"cache": {"ttl": None}}, "field `cache` is wrong: `ttl` must be a duration as text"),
    ({"cache": {"ttl": 86400}}, "field `cache` is wrong: `ttl` must be a duration as text"),
    ({"cache": {"ttl": "24h", "sampled": None}, "temperature": 0}, "field `cache` is wrong: `sampled` must be true or false, not null."),
    ({"cache": "24h"}, 'field `cache` is wrong: must be false or {"ttl": "24h"}'),
    ({"cache": 0}, 'field `cache` is wrong: must be false or {"ttl": "24h"}'),
    ({"cache": {"ttl": timedelta(seconds=1.5)}}, "field `cache.ttl` is wrong: must be whole seconds, not 1.5."),
]  # fmt: skip


@pytest.mark.parametrize(("task", "says"), CACHE_REFUSED)
def test_a_cache_the_worker_refuses_is_refused_in_its_words(task: dict[str, Any], says: str) -> None:
    with pytest.raises(InvalidTask) as e:
        E.build({"prompt": "x", **task})
    assert_sentence(e.value, says)
    if says.endswith("."):  # the whole sentence
        assert str(e.value) == says


def test_a_cached_tasks_letter_is_replayed_as_llmq_dlq_replay_writes_cache() -> None:
    def replayed(cache: str) -> Any:
        return json.loads(E.replayed_task('{"v":1,"prompt":"x","cache":' + cache + "}", U, None)).get("cache")

    assert replayed('{"sampled":false,"ttl":"24h"}') == {"ttl": "24h"}
    assert list(replayed('{"sampled":true,"ttl":"24h"}').items()) == [("ttl", "24h"), ("sampled", True)]
    # Replays do not check: true is written back as it came, null left out.
    assert (replayed("true"), replayed("false"), replayed("null")) == (True, False, None)
    for cache in (
        '{"ttl":"24h","keep":1}',
        '{"ttl":"24h","ttl":"1h"}',
        '{"ttl":"24h","sampled":null}',
        "{}",
        '{"ttl":5}',
        "0",
        '"24h"',
    ):
        task = '{"v":1,"prompt":"x","cache":' + cache + "}"
        assert E.replayed_task(task, U, None) == task, "serde refuses it: replayed as it came"


def test_a_cached_answer_is_read_from_its_record() -> None:
    base = {"task_id": U, "queue": "q", "status": "succeeded", "output": "hi", "cost_usd": 0.0}
    other = str(uuid.uuid4())
    record = TaskRecord.parse(json.dumps({**base, "cached": True, "cached_from": other}), U)
    assert record is not None and (record.cached, record.cached_from) == (True, other)
    called = TaskRecord.parse(json.dumps(base), U)
    assert called is not None and (called.cached, called.cached_from) == (False, None)


def test_a_copy_of_a_keyed_task_is_read_from_its_record() -> None:
    base = {"task_id": U, "queue": "q", "status": "succeeded", "output": "hi", "cost_usd": 0.0}
    first = str(uuid.uuid4())
    record = TaskRecord.parse(json.dumps({**base, "duplicate_of": first}), U)
    assert record is not None and record.duplicate_of == first and record.cached_from is None
    called = TaskRecord.parse(json.dumps(base), U)
    assert called is not None and called.duplicate_of is None


def test_a_keyed_task_is_written_with_its_key_and_window() -> None:
    head = f'{{"v":1,"prompt":"x","id":"{U}","enqueued_at":"2030-01-02T03:04:05Z"'
    assert written(idempotency_key="order-42") == head + ',"idempotency_key":"order-42"}'
    assert (
        written(idempotency_key="order-42", idempotency_window="1h")
        == head + ',"idempotency_key":"order-42","idempotency_window":"1h"}'
    )
    daily = json.loads(written(idempotency_key="k", idempotency_window=timedelta(hours=24)))
    assert daily["idempotency_window"] == "86400s"
    assert "idempotency_window" not in json.loads(written(idempotency_key="k", idempotency_window=None))
    # Taken as the worker takes them: the ends of the range, any humantime spelling; a key
    # only of spaces is a key (only an empty one is refused).
    for window in ("1s", "1000ms", "30d", "720h", "2592000s", "1h 30m", "1.5d", " 2h"):
        written(idempotency_key="k", idempotency_window=window)
    written(idempotency_key=" ")


def _window(message: str) -> str:
    return f"field `idempotency_window` is wrong: {message}."


KEY_EMPTY = (
    "field `idempotency_key` is wrong: is empty; give each task that must run once a key of its own, "
    "or leave it out."
)
WINDOW_WITHOUT_KEY = _window(
    "needs idempotency_key: it is how long a key is remembered; add the key or drop the window"
)
IDEMPOTENCY_REFUSED: list[tuple[dict[str, Any], str]] = [
    # Envelope::check_idempotency, in its words and order.
    ({"idempotency_key": ""}, KEY_EMPTY),
    ({"idempotency_key": "", "idempotency_window": "soon"}, KEY_EMPTY),
    ({"idempotency_window": "1h"}, WINDOW_WITHOUT_KEY),
    ({"idempotency_window": "soon"}, WINDOW_WITHOUT_KEY),
    ({"idempotency_key": None, "idempotency_window": "1h"}, WINDOW_WITHOUT_KEY),
    ({"idempotency_key": "k", "idempotency_window": "soon"}, _window('`soon` is not a duration (expected number at 0); write it as e.g. "10m" or "24h"')),
    ({"idempotency_key": "k", "idempotency_window": "1 d 2"}, _window('`1 d 2` is not a duration (time unit needed, for example 2sec or 2ms); write it as e.g. "10m" or "24h"')),
    ({"idempotency_key": "k", "idempotency_window": "1" * 50 + "x"}, "field `idempotency_window` is wrong: `" + "1" * 40 + "\u2026` is not a duration ("),
    ({"idempotency_key": "k", "idempotency_window": "0.5s"}, _window('0.5s is not between 1s and 30d; give e.g. "24h"')),
    ({"idempotency_key": "k", "idempotency_window": "0"}, _window('0 is not between 1s and 30d; give e.g. "24h"')),
    ({"idempotency_key": "k", "idempotency_window": "31d"}, _window('31d is not between 1s and 30d; give e.g. "24h"')),
    ({"idempotency_key": "k", "idempotency_window": " 31d "}, _window('31d is not between 1s and 30d; give e.g. "24h"')),
    ({"idempotency_key": "k", "idempotency_window": "2592000.000000001s"}, _window('2592000.000000001s is not between 1s and 30d; give e.g. "24h"')),
    ({"idempotency_key": "k", "idempotency_window": timedelta(0)}, _window('0s is not between 1s and 30d; give e.g. "24h"')),
    ({"idempotency_key": "k", "idempotency_window": timedelta(seconds=1.5)}, _window("must be whole seconds, not 1.5")),
    # Envelope::check's order: deadline and cache before it, the NUL checks after it.
    ({"idempotency_key": "", "deadline": "2h"}, "field `deadline` is wrong: 2h is shorter than the 24h"),
    ({"idempotency_window": "1h", "cache": True}, "field `cache` is wrong: true needs"),
    ({"idempotency_key": "", "model": "a\u0000b"}, KEY_EMPTY),
    ({"idempotency_window": "1h", "model": "a\u0000b"}, WINDOW_WITHOUT_KEY),
    ({"idempotency_key": "a\u0000b", "idempotency_window": "soon"}, "field `idempotency_window` is wrong: `soon` is not a duration"),
    ({"idempotency_key": "a\u0000b"}, "field `idempotency_key` is wrong: contains a NUL character (\\u0000)"),
    # Its type, which serde refuses before any check.
    ({"idempotency_key": "k", "idempotency_window": 3600}, "field `idempotency_window` is wrong: must be a string."),
    ({"idempotency_key": 42}, "field `idempotency_key` is wrong: must be a string."),
]  # fmt: skip


@pytest.mark.parametrize(("task", "says"), IDEMPOTENCY_REFUSED)
def test_a_key_or_window_the_worker_refuses_is_refused_in_its_words(task: dict[str, Any], says: str) -> None:
    with pytest.raises(InvalidTask) as e:
        E.build({"prompt": "x", **task})
    assert_sentence(e.value, says)
    if says.endswith("."):  # the whole sentence
        assert str(e.value) == says


def test_a_keyed_tasks_letter_is_replayed_with_its_key_and_window() -> None:
    task = '{"v":1,"prompt":"x","idempotency_key":"k","idempotency_window":"1h"}'
    replayed = json.loads(E.replayed_task(task, U, None))
    assert (replayed["idempotency_key"], replayed["idempotency_window"]) == ("k", "1h")
    unset = json.loads(E.replayed_task('{"v":1,"prompt":"x","idempotency_window":null}', U, None))
    assert "idempotency_window" not in unset
    # Replays do not check (a window without a key is written back), but serde refuses a
    # window that is not text: replayed as it came.
    keyless = json.loads(E.replayed_task('{"v":1,"prompt":"x","idempotency_window":"1h"}', U, None))
    assert keyless["idempotency_window"] == "1h"
    odd = '{"v":1,"prompt":"x","idempotency_key":"k","idempotency_window":3600}'
    assert E.replayed_task(odd, U, None) == odd


def test_a_batch_id_is_written_as_given() -> None:
    head = f'{{"v":1,"prompt":"x","id":"{U}","enqueued_at":"2030-01-02T03:04:05Z"'
    assert written(batch_id="batch_2030-01-02.a:1") == head + ',"batch_id":"batch_2030-01-02.a:1"}'
    assert "batch_id" not in json.loads(written(batch_id=None))
    # Taken as the worker takes them: one character, 128, each character it allows.
    for batch_id in ("b", "x" * 128, "AZaz09-_.:", "-", ":", "."):
        assert json.loads(written(batch_id=batch_id))["batch_id"] == batch_id


BATCH_ID_RULE = "field `batch_id` is wrong: must be 1 to 128 letters, digits, `-`, `_`, `.` or `:`."
BATCH_ID_REFUSED: list[tuple[dict[str, Any], str]] = [
    # check_batch_id, in its words.
    ({"batch_id": ""}, BATCH_ID_RULE),
    ({"batch_id": "x" * 129}, BATCH_ID_RULE),
    ({"batch_id": "a b"}, BATCH_ID_RULE),
    ({"batch_id": "a/b"}, BATCH_ID_RULE),
    ({"batch_id": " "}, BATCH_ID_RULE),
    ({"batch_id": "b\n"}, BATCH_ID_RULE),
    ({"batch_id": "b\u0000"}, BATCH_ID_RULE),
    ({"batch_id": "caf\u00e9"}, BATCH_ID_RULE),  # a letter, but not ASCII
    ({"batch_id": "\uff11"}, BATCH_ID_RULE),  # a digit, but not ASCII
    ({"batch_id": "a+b"}, BATCH_ID_RULE),
    # Envelope::check's order: the idempotency checks before it, the NUL checks after it.
    ({"batch_id": "", "idempotency_key": ""}, KEY_EMPTY),
    ({"batch_id": "", "model": "a\u0000b"}, BATCH_ID_RULE),
    # Its type, which serde refuses before any check.
    ({"batch_id": 42}, "field `batch_id` is wrong: must be a string."),
]  # fmt: skip


@pytest.mark.parametrize(("task", "says"), BATCH_ID_REFUSED)
def test_a_batch_id_the_worker_refuses_is_refused_in_its_words(task: dict[str, Any], says: str) -> None:
    with pytest.raises(InvalidTask) as e:
        E.build({"prompt": "x", **task})
    assert_sentence(e.value, says)
    assert str(e.value) == says


def test_a_batched_tasks_letter_is_replayed_with_its_batch_id() -> None:
    task = '{"v":1,"prompt":"x","batch_id":"b-1"}'
    assert json.loads(E.replayed_task(task, U, None))["batch_id"] == "b-1"
    unset = json.loads(E.replayed_task('{"v":1,"prompt":"x","batch_id":null}', U, None))
    assert "batch_id" not in unset
    # Replays do not check (a batch id the worker would refuse is written back), but serde
    # refuses one that is not text: replayed as it came.
    odd = json.loads(E.replayed_task('{"v":1,"prompt":"x","batch_id":"a b"}', U, None))
    assert odd["batch_id"] == "a b"
    number = '{"v":1,"prompt":"x","batch_id":7}'
    assert E.replayed_task(number, U, None) == number


# uuid.uuid5(uuid.NAMESPACE_OID, "llmq-chain-key:<queue>:<tenant's bytes>:<tenant>:<key>"),
# computed with Python's uuid module: (queue, tenant, key, id).
CHAIN_KEY_IDS = [
    ("default", None, "release-42", "a32eb052-b09c-573b-9365-9ace304218df"),
    ("default", "acme", "release-42", "aeacc8ba-0ab7-5ba6-9c32-e8cabcd52d3e"),
    ("default", "\u00e9", "release-42", "a9e91551-ec8d-5043-9bc8-df75e6a3727e"),  # 2 bytes
    ("q", None, "release-42", "00f1064a-4fd0-519f-81ef-b5210ec088d9"),
]


@pytest.mark.parametrize(("queue", "tenant", "key", "chain_id"), CHAIN_KEY_IDS)
def test_a_keyed_chain_without_an_id_is_named_as_the_worker_names_it(
    queue: str, tenant: str | None, key: str, chain_id: str
) -> None:
    assert chain_key_id(queue, tenant, key) == chain_id
    spec: dict[str, Any] = {"idempotency_key": key, "steps": [{"name": "a", "prompt": "x"}]}
    if tenant is not None:
        spec["tenant"] = tenant
    got, text = build_chain(spec, None, 1 << 20, queue)
    assert got == chain_id
    written = json.loads(text)
    # The worker names it from the key: no chain_id is written, the key is.
    assert "chain_id" not in written and written["idempotency_key"] == key
    assert build_chain(spec, None, 1 << 20, queue)[0] == chain_id, "submitted twice: one chain"
    # A null chain_id is none.
    assert build_chain({**spec, "chain_id": None}, None, 1 << 20, queue) == (got, text)


def test_a_chain_id_or_no_key_names_a_chain_as_before() -> None:
    steps = [{"name": "a", "prompt": "x"}]
    named, text = build_chain({"chain_id": "c1", "idempotency_key": "k", "steps": steps}, None, 1 << 20, "q")
    assert named == "c1" and json.loads(text)["chain_id"] == "c1"
    fresh, text = build_chain({"steps": steps}, None, 1 << 20, "q")
    assert uuid.UUID(fresh).version == 4 and json.loads(text)["chain_id"] == fresh
    assert build_chain({"steps": steps}, None, 1 << 20, "q")[0] != fresh
    # The key names the chain on one queue for one tenant, and nothing else does.
    variants: list[tuple[str, dict[str, Any]]] = [
        ("q", {}),
        ("r", {}),
        ("q", {"tenant": "acme"}),
        ("q", {"tenant": "acme", "priority": 3}),
    ]
    ids = [
        build_chain({"idempotency_key": "k", "steps": steps, **extra}, None, 1 << 20, q)[0]
        for q, extra in variants
    ]
    assert len(set(ids)) == 3 and ids[2] == ids[3]
    # A key of spaces is a key (only an empty one is refused).
    spaces = build_chain({"idempotency_key": " ", "steps": steps}, None, 1 << 20, "q")[0]
    assert spaces == chain_key_id("q", None, " ")


CHAIN_KEY_REFUSED = (
    "the chain is invalid: `idempotency_key` is empty or holds a NUL character; give the chain a key of its "
    "own, or leave it out."
)


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"idempotency_key": ""}, CHAIN_KEY_REFUSED),
        ({"idempotency_key": "a\u0000b"}, CHAIN_KEY_REFUSED),
        ({"idempotency_key": "", "chain_id": "c1"}, CHAIN_KEY_REFUSED),
        ({"idempotency_key": 42}, "the chain is invalid: `idempotency_key` must be a string, not int."),
        ({"idempotency_key": "k\ud800"}, "the chain is invalid: `idempotency_key` holds a lone surrogate"),
        # Chain::parse's order: the chain id before the key.
        ({"idempotency_key": "", "chain_id": " "}, "the chain is invalid: `chain_id` is empty"),
        (
            {"idempotency_key": 42, "chain_id": " "},
            "the chain is invalid: `idempotency_key` must be a string",
        ),
        ({"idempotency_key": "k", "tenant": "k\ud800"}, "the chain is invalid: it is not JSON"),
    ],
)
def test_a_chain_key_the_worker_refuses_is_refused_in_its_words(change: dict[str, Any], says: str) -> None:
    with pytest.raises(InvalidChain) as e:
        build_chain({"steps": [{"name": "a", "prompt": "x"}], **change}, None, 1 << 20, "q")
    assert_sentence(e.value, says)
    if says.endswith("."):
        assert str(e.value) == says

-- Every finished task, and every provider call with its tokens and cost.

CREATE TABLE tasks (
    task_id       UUID PRIMARY KEY,
    queue         TEXT NOT NULL,
    chain_id      TEXT,
    task_type     TEXT NOT NULL,
    status        TEXT NOT NULL,
    attempts      INTEGER NOT NULL,
    provider      TEXT,
    model         TEXT,
    input_tokens  BIGINT NOT NULL DEFAULT 0,
    output_tokens BIGINT NOT NULL DEFAULT 0,
    cost_usd      NUMERIC(20, 10) NOT NULL DEFAULT 0,
    error         TEXT,
    error_class   TEXT,
    finished_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX tasks_finished_at ON tasks (finished_at);
CREATE INDEX tasks_chain_id ON tasks (chain_id) WHERE chain_id IS NOT NULL;

-- One row per provider call. (task_id, run, attempt, call_no) makes a redelivered task's
-- calls idempotent: a worker that repeats an attempt after another worker's crash does not
-- bill it twice. `run` counts replays from the dead letters, whose calls are new calls.
CREATE TABLE provider_calls (
    task_id          UUID NOT NULL,
    run              INTEGER NOT NULL DEFAULT 0,
    attempt          INTEGER NOT NULL,
    call_no          INTEGER NOT NULL,
    queue            TEXT NOT NULL,
    chain_id         TEXT,
    task_type        TEXT NOT NULL,
    provider         TEXT NOT NULL,
    model            TEXT NOT NULL,
    input_tokens     BIGINT NOT NULL,
    output_tokens    BIGINT NOT NULL,
    cached_tokens    BIGINT NOT NULL,
    reasoning_tokens BIGINT NOT NULL,
    cost_usd         NUMERIC(20, 10) NOT NULL,
    latency_ms       INTEGER NOT NULL,
    outcome          TEXT NOT NULL,
    error_class      TEXT,
    error            TEXT,
    worker           TEXT NOT NULL,
    called_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (task_id, run, attempt, call_no)
);

CREATE INDEX provider_calls_called_at ON provider_calls (called_at);

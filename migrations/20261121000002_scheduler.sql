-- The scheduler: its fencing token, closed quota windows and archived dead letters.

-- One row: the highest fencing token that has written. Every write of a scheduler duty runs
-- in a transaction that first raises `fence` to its own token, or finds a higher one and rolls
-- back, so a scheduler that lost its lease while paused cannot write after its successor has.
CREATE TABLE scheduler_lease (
    id         SMALLINT PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    fence      BIGINT NOT NULL,
    holder     TEXT NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

INSERT INTO scheduler_lease (id, fence, holder) VALUES (1, 0, '');

-- Usage of every closed quota window, recorded before its Redis counter expires.
-- A day row carries requests (its usd is NULL: spend is counted per month); a month row
-- carries usd (its requests is NULL: requests are counted per day).
CREATE TABLE quota_history (
    provider     TEXT NOT NULL,
    window_kind  TEXT NOT NULL CHECK (window_kind IN ('day', 'month')),
    window_start DATE NOT NULL,
    requests     BIGINT,
    usd          NUMERIC(20, 6),
    closed_at    TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (provider, window_kind, window_start)
);

-- Dead letters trimmed from Redis, archived first. `dead_id` is the entry id the letter had in
-- the queue's dead stream; `task` the envelope (or raw payload) as it was when the task died.
CREATE TABLE dead_letters_archive (
    queue       TEXT NOT NULL,
    dead_id     TEXT NOT NULL,
    task_id     TEXT NOT NULL,
    error       TEXT NOT NULL,
    class       TEXT NOT NULL,
    attempts    BIGINT NOT NULL,
    failed_at   TIMESTAMPTZ,
    task        TEXT NOT NULL,
    archived_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (queue, dead_id)
);

CREATE INDEX dead_letters_archive_archived_at ON dead_letters_archive (archived_at);
CREATE INDEX dead_letters_archive_task_id ON dead_letters_archive (queue, task_id);

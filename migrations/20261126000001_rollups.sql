-- Rollups of the ledger per UTC day, so that reports read a few thousand rows however long the
-- ledger grows (docs/operations.md, "The ledger at scale"). They are kept by statement-level
-- triggers, in the same transaction as the rows they sum: a row and its share of a rollup
-- commit together or not at all, so no crash, restart or replay can make them differ, and
-- nothing has to run for them to be current.
--
-- `shard` spreads each key's hot row over up to 16 rows, by the writing connection: workers
-- committing at once do not queue on one row lock. Readers sum over shards.
--
-- Rows written before this migration are summed into shard 0 below, with the tables locked
-- against writes meanwhile (workers retry their ledger writes), so none is missed or counted
-- twice.

LOCK TABLE provider_calls, tasks IN SHARE ROW EXCLUSIVE MODE;

-- A finished task that counts for or against its model: it ended on the model's own account
-- (an outage, a rate limit, a quota or a refused task is neither). Reports use these two.
CREATE FUNCTION ledger_task_counts(t tasks) RETURNS boolean LANGUAGE sql IMMUTABLE AS $$
    SELECT t.status IN ('succeeded', 'dead', 'failed')
        AND coalesce(t.error_class, 'fatal') IN ('fatal', 'retryable')
$$;

-- A finished task that succeeded: no review or check rejected its output.
CREATE FUNCTION ledger_task_succeeded(t tasks) RETURNS boolean LANGUAGE sql IMMUTABLE AS $$
    SELECT t.status = 'succeeded' AND t.verdict IS NOT FALSE
$$;

-- Every queue the ledger has seen: `llmq insights` and the routing duty list queues from
-- here instead of `SELECT DISTINCT queue` over every task.
CREATE TABLE ledger_queues (queue TEXT PRIMARY KEY);

-- Calls per day, queue, provider, model and task type. `calls` counts rows that stand for a
-- call (every outcome but `unsent`, as `llmq costs` always counted).
CREATE TABLE call_rollups (
    day              DATE NOT NULL,
    queue            TEXT NOT NULL,
    provider         TEXT NOT NULL,
    model            TEXT NOT NULL,
    task_type        TEXT NOT NULL,
    shard            SMALLINT NOT NULL,
    calls            BIGINT NOT NULL,
    input_tokens     BIGINT NOT NULL,
    output_tokens    BIGINT NOT NULL,
    cached_tokens    BIGINT NOT NULL,
    reasoning_tokens BIGINT NOT NULL,
    cost_usd         NUMERIC(30, 10) NOT NULL,
    batch_saved_usd  NUMERIC(30, 10) NOT NULL,
    PRIMARY KEY (day, queue, provider, model, task_type, shard)
) WITH (fillfactor = 50);

-- Finished tasks per day (of `finished_at`), queue, the provider and model that finished them
-- ('' for none), task type and risk ('' for none).
CREATE TABLE task_rollups (
    day           DATE NOT NULL,
    queue         TEXT NOT NULL,
    provider      TEXT NOT NULL,
    model         TEXT NOT NULL,
    task_type     TEXT NOT NULL,
    risk          TEXT NOT NULL,
    shard         SMALLINT NOT NULL,
    tasks         BIGINT NOT NULL,
    -- of those, the ones that count for or against their model, and the ones that succeeded
    counted       BIGINT NOT NULL,
    successes     BIGINT NOT NULL,
    cost_usd      NUMERIC(30, 10) NOT NULL,
    -- over the counted tasks: their cost, how many had a duration, and its sum
    counted_cost_usd NUMERIC(30, 10) NOT NULL,
    durations     BIGINT NOT NULL,
    duration_ms   BIGINT NOT NULL,
    PRIMARY KEY (day, queue, provider, model, task_type, risk, shard)
) WITH (fillfactor = 50);

-- Calls and finished tasks per day and chain ('' for calls and tasks of no chain).
CREATE TABLE chain_rollups (
    day             DATE NOT NULL,
    chain_id        TEXT NOT NULL,
    shard           SMALLINT NOT NULL,
    calls           BIGINT NOT NULL,
    tasks           BIGINT NOT NULL,
    input_tokens    BIGINT NOT NULL,
    output_tokens   BIGINT NOT NULL,
    cached_tokens   BIGINT NOT NULL,
    cost_usd        NUMERIC(30, 10) NOT NULL,
    batch_saved_usd NUMERIC(30, 10) NOT NULL,
    PRIMARY KEY (day, chain_id, shard)
) WITH (fillfactor = 50);

-- Adds the calls `added` and takes away the calls `removed` (a completed row is its old
-- version removed and its new one added). Keys are written in order, so two transactions
-- never wait for each other's rows in opposite orders within one statement.
CREATE FUNCTION ledger_roll_calls(added provider_calls[], removed provider_calls[])
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    -- A statement trigger fires for statements that changed no row (an upsert that found
    -- nothing to update): nothing to add then.
    IF cardinality(added) + cardinality(removed) = 0 THEN
        RETURN;
    END IF;
    WITH c AS (
        SELECT 1 AS s, a.* FROM unnest(added) a
        UNION ALL
        SELECT -1, o.* FROM unnest(removed) o
    )
    INSERT INTO call_rollups AS r
    SELECT (c.called_at AT TIME ZONE 'UTC')::date, c.queue, c.provider, c.model, c.task_type,
        (pg_backend_pid() % 16)::smallint,
        sum(c.s * (c.outcome <> 'unsent')::int), sum(c.s * c.input_tokens),
        sum(c.s * c.output_tokens), sum(c.s * c.cached_tokens), sum(c.s * c.reasoning_tokens),
        sum(c.s * c.cost_usd), coalesce(sum(c.s * (c.list_cost_usd - c.cost_usd)), 0)
    FROM c GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4, 5
    ON CONFLICT (day, queue, provider, model, task_type, shard) DO UPDATE SET
        calls = r.calls + EXCLUDED.calls,
        input_tokens = r.input_tokens + EXCLUDED.input_tokens,
        output_tokens = r.output_tokens + EXCLUDED.output_tokens,
        cached_tokens = r.cached_tokens + EXCLUDED.cached_tokens,
        reasoning_tokens = r.reasoning_tokens + EXCLUDED.reasoning_tokens,
        cost_usd = r.cost_usd + EXCLUDED.cost_usd,
        batch_saved_usd = r.batch_saved_usd + EXCLUDED.batch_saved_usd;

    WITH c AS (
        SELECT 1 AS s, a.* FROM unnest(added) a
        UNION ALL
        SELECT -1, o.* FROM unnest(removed) o
    )
    INSERT INTO chain_rollups AS r
    SELECT (c.called_at AT TIME ZONE 'UTC')::date, coalesce(c.chain_id, ''),
        (pg_backend_pid() % 16)::smallint,
        sum(c.s * (c.outcome <> 'unsent')::int), 0, sum(c.s * c.input_tokens),
        sum(c.s * c.output_tokens), sum(c.s * c.cached_tokens), sum(c.s * c.cost_usd),
        coalesce(sum(c.s * (c.list_cost_usd - c.cost_usd)), 0)
    FROM c GROUP BY 1, 2 ORDER BY 1, 2
    ON CONFLICT (day, chain_id, shard) DO UPDATE SET
        calls = r.calls + EXCLUDED.calls,
        input_tokens = r.input_tokens + EXCLUDED.input_tokens,
        output_tokens = r.output_tokens + EXCLUDED.output_tokens,
        cached_tokens = r.cached_tokens + EXCLUDED.cached_tokens,
        cost_usd = r.cost_usd + EXCLUDED.cost_usd,
        batch_saved_usd = r.batch_saved_usd + EXCLUDED.batch_saved_usd;

    INSERT INTO ledger_queues SELECT DISTINCT queue FROM unnest(added) ORDER BY 1
    ON CONFLICT DO NOTHING;
END $$;

-- The same for finished tasks: a task written again (a new status, a verdict) moves from its
-- old row's keys to its new one's.
CREATE FUNCTION ledger_roll_tasks(added tasks[], removed tasks[])
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    -- A statement trigger fires for statements that changed no row (an upsert that found
    -- nothing to update): nothing to add then.
    IF cardinality(added) + cardinality(removed) = 0 THEN
        RETURN;
    END IF;
    WITH t AS (
        SELECT 1 AS s, ledger_task_counts(a) AS counts, ledger_task_succeeded(a) AS ok, a.*
        FROM unnest(added) a
        UNION ALL
        SELECT -1, ledger_task_counts(o), ledger_task_succeeded(o), o.* FROM unnest(removed) o
    )
    INSERT INTO task_rollups AS r
    SELECT (t.finished_at AT TIME ZONE 'UTC')::date, t.queue, coalesce(t.provider, ''),
        coalesce(t.model, ''), t.task_type, coalesce(t.risk, ''),
        (pg_backend_pid() % 16)::smallint,
        sum(t.s),
        coalesce(sum(t.s) FILTER (WHERE t.counts), 0),
        coalesce(sum(t.s) FILTER (WHERE t.counts AND t.ok), 0),
        sum(t.s * t.cost_usd),
        coalesce(sum(t.s * t.cost_usd) FILTER (WHERE t.counts), 0),
        coalesce(sum(t.s) FILTER (WHERE t.counts AND t.duration_ms IS NOT NULL), 0),
        coalesce(sum(t.s * t.duration_ms) FILTER (WHERE t.counts), 0)
    FROM t GROUP BY 1, 2, 3, 4, 5, 6 ORDER BY 1, 2, 3, 4, 5, 6
    ON CONFLICT (day, queue, provider, model, task_type, risk, shard) DO UPDATE SET
        tasks = r.tasks + EXCLUDED.tasks,
        counted = r.counted + EXCLUDED.counted,
        successes = r.successes + EXCLUDED.successes,
        cost_usd = r.cost_usd + EXCLUDED.cost_usd,
        counted_cost_usd = r.counted_cost_usd + EXCLUDED.counted_cost_usd,
        durations = r.durations + EXCLUDED.durations,
        duration_ms = r.duration_ms + EXCLUDED.duration_ms;

    WITH t AS (
        SELECT 1 AS s, a.* FROM unnest(added) a
        UNION ALL
        SELECT -1, o.* FROM unnest(removed) o
    )
    INSERT INTO chain_rollups AS r
    SELECT (t.finished_at AT TIME ZONE 'UTC')::date, coalesce(t.chain_id, ''),
        (pg_backend_pid() % 16)::smallint, 0, sum(t.s), 0, 0, 0, 0, 0
    FROM t GROUP BY 1, 2 ORDER BY 1, 2
    ON CONFLICT (day, chain_id, shard) DO UPDATE SET tasks = r.tasks + EXCLUDED.tasks;

    INSERT INTO ledger_queues SELECT DISTINCT queue FROM unnest(added) ORDER BY 1
    ON CONFLICT DO NOTHING;
END $$;

CREATE FUNCTION provider_calls_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM ledger_roll_calls(ARRAY(SELECT n::provider_calls FROM new_rows n), '{}');
    RETURN NULL;
END $$;

CREATE FUNCTION provider_calls_updated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM ledger_roll_calls(ARRAY(SELECT n::provider_calls FROM new_rows n), ARRAY(SELECT o::provider_calls FROM old_rows o));
    RETURN NULL;
END $$;

CREATE FUNCTION provider_calls_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM ledger_roll_calls('{}', ARRAY(SELECT o::provider_calls FROM old_rows o));
    RETURN NULL;
END $$;

CREATE FUNCTION tasks_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM ledger_roll_tasks(ARRAY(SELECT n::tasks FROM new_rows n), '{}');
    RETURN NULL;
END $$;

CREATE FUNCTION tasks_updated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM ledger_roll_tasks(ARRAY(SELECT n::tasks FROM new_rows n), ARRAY(SELECT o::tasks FROM old_rows o));
    RETURN NULL;
END $$;

CREATE FUNCTION tasks_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM ledger_roll_tasks('{}', ARRAY(SELECT o::tasks FROM old_rows o));
    RETURN NULL;
END $$;

CREATE TRIGGER provider_calls_roll_insert AFTER INSERT ON provider_calls
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION provider_calls_inserted();
CREATE TRIGGER provider_calls_roll_update AFTER UPDATE ON provider_calls
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION provider_calls_updated();
CREATE TRIGGER provider_calls_roll_delete AFTER DELETE ON provider_calls
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION provider_calls_deleted();
CREATE TRIGGER tasks_roll_insert AFTER INSERT ON tasks
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION tasks_inserted();
CREATE TRIGGER tasks_roll_update AFTER UPDATE ON tasks
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION tasks_updated();
CREATE TRIGGER tasks_roll_delete AFTER DELETE ON tasks
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION tasks_deleted();

-- One chain's calls (`llmq costs --chain-id`) are read from the raw rows, by this index.
CREATE INDEX provider_calls_chain_id ON provider_calls (chain_id, called_at)
    WHERE chain_id IS NOT NULL;

-- What was written before.
INSERT INTO ledger_queues
    SELECT queue FROM provider_calls UNION SELECT queue FROM tasks;

INSERT INTO call_rollups
SELECT (called_at AT TIME ZONE 'UTC')::date, queue, provider, model, task_type, 0,
    count(*) FILTER (WHERE outcome <> 'unsent'), sum(input_tokens), sum(output_tokens),
    sum(cached_tokens), sum(reasoning_tokens), sum(cost_usd),
    coalesce(sum(list_cost_usd - cost_usd), 0)
FROM provider_calls GROUP BY 1, 2, 3, 4, 5;

INSERT INTO task_rollups
SELECT (finished_at AT TIME ZONE 'UTC')::date, queue, coalesce(provider, ''),
    coalesce(model, ''), task_type, coalesce(risk, ''), 0,
    count(*),
    count(*) FILTER (WHERE ledger_task_counts(tasks)),
    count(*) FILTER (WHERE ledger_task_counts(tasks) AND ledger_task_succeeded(tasks)),
    sum(cost_usd),
    coalesce(sum(cost_usd) FILTER (WHERE ledger_task_counts(tasks)), 0),
    count(duration_ms) FILTER (WHERE ledger_task_counts(tasks)),
    coalesce(sum(duration_ms) FILTER (WHERE ledger_task_counts(tasks)), 0)
FROM tasks GROUP BY 1, 2, 3, 4, 5, 6;

INSERT INTO chain_rollups
SELECT day, chain_id, 0, sum(calls), sum(tasks), sum(input_tokens), sum(output_tokens),
    sum(cached_tokens), sum(cost_usd), sum(batch_saved_usd)
FROM (
    SELECT (called_at AT TIME ZONE 'UTC')::date AS day, coalesce(chain_id, '') AS chain_id,
        count(*) FILTER (WHERE outcome <> 'unsent') AS calls, 0 AS tasks,
        sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens,
        sum(cached_tokens) AS cached_tokens, sum(cost_usd) AS cost_usd,
        coalesce(sum(list_cost_usd - cost_usd), 0) AS batch_saved_usd
    FROM provider_calls GROUP BY 1, 2
    UNION ALL
    SELECT (finished_at AT TIME ZONE 'UTC')::date, coalesce(chain_id, ''), 0, count(*),
        0, 0, 0, 0, 0
    FROM tasks GROUP BY 1, 2
) s GROUP BY 1, 2;

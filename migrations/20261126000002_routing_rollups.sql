-- What learned routing reads (`Ledger::routing_stats`), rolled up per UTC day like the costs
-- (20261126000001_rollups.sql).
--
-- Routing counts calls, and a call's success depends on its task: it answered, and its task
-- did not end failed nor have its output rejected. So that the rollup stays a sum of
-- `provider_calls` rows alone (exact, and kept without reading another table under
-- concurrent writes), each call row carries what its task says: `task_status`, `task_verdict`
-- and `task_risk`, NULL while the task has no row. The ledger writes them with the calls of a
-- finished task; when a task's row is written or judged later, a trigger copies them to the
-- task's calls (only where they differ), and that update moves the call's share of the
-- rollup like any other.

LOCK TABLE provider_calls, tasks IN SHARE ROW EXCLUSIVE MODE;

ALTER TABLE provider_calls
    ADD COLUMN task_status  TEXT,
    ADD COLUMN task_verdict BOOLEAN,
    ADD COLUMN task_risk    TEXT;

-- Latency buckets: bucket b holds answered calls of [1.1^b - 1, 1.1^(b+1) - 1) ms, b < 160
-- (the last holds everything slower than 1.1^159 ms, about 11 weeks); a median read from
-- them is within 5 % of the true one.
CREATE FUNCTION ledger_latency_bucket(ms integer) RETURNS integer LANGUAGE sql IMMUTABLE AS $$
    SELECT least(159, floor(ln(1 + greatest(ms, 0)) / ln(1.1)))::integer
$$;

CREATE FUNCTION ledger_hist_step(h bigint[], bucket integer, n bigint) RETURNS bigint[]
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF h IS NULL THEN
        h := array_fill(0::bigint, ARRAY[160]);
    END IF;
    IF bucket IS NOT NULL AND n IS NOT NULL THEN
        h[bucket + 1] := h[bucket + 1] + n;
    END IF;
    RETURN h;
END $$;

-- `ledger_hist(bucket, n)`: a histogram of n per bucket.
CREATE AGGREGATE ledger_hist(integer, bigint) (SFUNC = ledger_hist_step, STYPE = bigint[]);

-- plpgsql, not sql: its plan is kept for the session instead of made at every call.
CREATE FUNCTION ledger_hist_add(a bigint[], b bigint[]) RETURNS bigint[]
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    RETURN (SELECT array_agg(coalesce(x, 0) + coalesce(y, 0) ORDER BY i)
        FROM unnest(a, b) WITH ORDINALITY AS u(x, y, i));
END $$;

-- `ledger_hist_sum(histogram)`: histograms added bucket by bucket.
CREATE AGGREGATE ledger_hist_sum(bigint[]) (SFUNC = ledger_hist_add, STYPE = bigint[]);

-- Per day, queue, provider, model, task type and the task's risk ('' while unknown): the calls
-- that count for or against their model (they answered, or failed on the task's account: an
-- outage, a rate limit or a quota is neither), those that succeeded, and the answered calls'
-- latencies.
CREATE TABLE routing_rollups (
    day       DATE NOT NULL,
    queue     TEXT NOT NULL,
    provider  TEXT NOT NULL,
    model     TEXT NOT NULL,
    task_type TEXT NOT NULL,
    risk      TEXT NOT NULL,
    shard     SMALLINT NOT NULL,
    tries     BIGINT NOT NULL,
    successes BIGINT NOT NULL,
    latency   BIGINT[] NOT NULL,
    PRIMARY KEY (day, queue, provider, model, task_type, risk, shard)
) WITH (fillfactor = 50);

-- A call that counts for or against its model, and one that succeeded: the definitions
-- `Ledger::routing_stats` and the rollups share.
CREATE FUNCTION ledger_call_counts(c provider_calls) RETURNS boolean LANGUAGE sql IMMUTABLE AS $$
    SELECT c.outcome = 'ok' OR (c.outcome = 'error' AND c.error_class IN ('fatal', 'retryable'))
$$;

CREATE FUNCTION ledger_call_succeeded(c provider_calls) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT c.outcome = 'ok' AND (c.task_status IS NULL OR c.task_status = 'succeeded')
        AND c.task_verdict IS NOT FALSE
$$;

CREATE FUNCTION ledger_roll_routing(added provider_calls[], removed provider_calls[])
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF cardinality(added) + cardinality(removed) = 0 THEN
        RETURN;
    END IF;
    WITH c AS (
        SELECT 1 AS s, a AS rec FROM unnest(added) a
        UNION ALL
        SELECT -1, o FROM unnest(removed) o
    )
    INSERT INTO routing_rollups AS r
    SELECT ((c.rec).called_at AT TIME ZONE 'UTC')::date, (c.rec).queue, (c.rec).provider,
        (c.rec).model, (c.rec).task_type, coalesce((c.rec).task_risk, ''),
        (pg_backend_pid() % 16)::smallint,
        sum(c.s),
        coalesce(sum(c.s) FILTER (WHERE ledger_call_succeeded(c.rec)), 0),
        coalesce(ledger_hist(ledger_latency_bucket((c.rec).latency_ms), c.s)
            FILTER (WHERE (c.rec).outcome = 'ok'), array_fill(0::bigint, ARRAY[160]))
    FROM c WHERE ledger_call_counts(c.rec)
    GROUP BY 1, 2, 3, 4, 5, 6 ORDER BY 1, 2, 3, 4, 5, 6
    ON CONFLICT (day, queue, provider, model, task_type, risk, shard) DO UPDATE SET
        tries = r.tries + EXCLUDED.tries,
        successes = r.successes + EXCLUDED.successes,
        latency = ledger_hist_add(r.latency, EXCLUDED.latency);
END $$;

CREATE OR REPLACE FUNCTION provider_calls_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    added provider_calls[] := ARRAY(SELECT n::provider_calls FROM new_rows n);
BEGIN
    PERFORM ledger_roll_calls(added, '{}');
    PERFORM ledger_roll_routing(added, '{}');
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION provider_calls_updated() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    added provider_calls[] := ARRAY(SELECT n::provider_calls FROM new_rows n);
    removed provider_calls[] := ARRAY(SELECT o::provider_calls FROM old_rows o);
BEGIN
    PERFORM ledger_roll_calls(added, removed);
    PERFORM ledger_roll_routing(added, removed);
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION provider_calls_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    removed provider_calls[] := ARRAY(SELECT o::provider_calls FROM old_rows o);
BEGIN
    PERFORM ledger_roll_calls('{}', removed);
    PERFORM ledger_roll_routing('{}', removed);
    RETURN NULL;
END $$;

-- A task written or judged: its calls carry its status, verdict and risk (a deleted task's
-- calls carry none again). Only rows that differ are written.
CREATE FUNCTION ledger_tell_calls(tasks_now tasks[], tasks_gone tasks[]) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    -- A statement trigger fires for statements that changed no row: nothing to look up then.
    IF cardinality(tasks_now) > 0 THEN
        UPDATE provider_calls c SET task_status = t.status, task_verdict = t.verdict,
            task_risk = t.risk
        FROM unnest(tasks_now) t
        WHERE c.task_id = t.task_id
          AND (c.task_status, c.task_verdict, c.task_risk)
              IS DISTINCT FROM (t.status, t.verdict, t.risk);
    END IF;
    IF cardinality(tasks_gone) > 0 THEN
        UPDATE provider_calls c SET task_status = NULL, task_verdict = NULL, task_risk = NULL
        FROM unnest(tasks_gone) g
        WHERE c.task_id = g.task_id
          AND (c.task_status IS NOT NULL OR c.task_verdict IS NOT NULL OR c.task_risk IS NOT NULL);
    END IF;
END $$;

CREATE OR REPLACE FUNCTION tasks_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    added tasks[] := ARRAY(SELECT n::tasks FROM new_rows n);
BEGIN
    PERFORM ledger_roll_tasks(added, '{}');
    PERFORM ledger_tell_calls(added, '{}');
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION tasks_updated() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    added tasks[] := ARRAY(SELECT n::tasks FROM new_rows n);
BEGIN
    PERFORM ledger_roll_tasks(added, ARRAY(SELECT o::tasks FROM old_rows o));
    PERFORM ledger_tell_calls(added, '{}');
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION tasks_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    removed tasks[] := ARRAY(SELECT o::tasks FROM old_rows o);
BEGIN
    PERFORM ledger_roll_tasks('{}', removed);
    PERFORM ledger_tell_calls('{}', removed);
    RETURN NULL;
END $$;

-- What was written before, summed as the rows stand: a call written before this migration
-- does not know its task's view yet (NULL), and counts as such. `Ledger::migrate` then copies
-- each task's view to its calls in batches of tasks, each batch its own transaction (the
-- rollup moves with every row it changes, as for any write), resuming after the last task
-- id recorded here, so the tables are never locked for the whole copy. Done when the row is
-- gone.
CREATE TABLE ledger_backfills (name TEXT PRIMARY KEY, after UUID NOT NULL);
INSERT INTO ledger_backfills VALUES ('task_views', '00000000-0000-0000-0000-000000000000');

INSERT INTO routing_rollups
SELECT (called_at AT TIME ZONE 'UTC')::date, queue, provider, model, task_type,
    coalesce(task_risk, ''), 0, count(*),
    count(*) FILTER (WHERE ledger_call_succeeded(c)),
    coalesce(ledger_hist(ledger_latency_bucket(latency_ms), 1) FILTER (WHERE outcome = 'ok'),
        array_fill(0::bigint, ARRAY[160]))
FROM provider_calls c WHERE ledger_call_counts(c)
GROUP BY 1, 2, 3, 4, 5, 6;

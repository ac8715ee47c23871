-- `tasks` and `provider_calls` partitioned by month (UTC) of `finished_at` and `called_at`, so
-- that retention drops whole partitions: no DELETE, no bloat, no vacuum behind (docs/
-- operations.md, "Retention"). The rollups are separate tables and outlive the partitions.
--
-- An existing ledger is not copied. Each table becomes the first partition of its new parent
-- as it stands, holding every row before a month boundary (`cutoff`, at least a week ahead,
-- and after its newest row);
-- months after it get partitions of their own. What would lock a populated ledger for long is
-- done before this migration by `llmq migrate` (`Ledger::migrate`), with the tables open:
-- the keys that include the time are built CONCURRENTLY, and a CHECK that every row is before
-- the cutoff is validated. Here, under the lock, nothing scans a row: the parents are made,
-- the old tables attached, their indexes attached to the parent's. A new ledger (empty
-- tables) takes the same path.
--
-- Keys: a partitioned table's unique key must hold its partition column, so a call is
-- (task_id, delivery, call_no, called_at), its `called_at` fixed when its row is first
-- written, and a task is (task_id, finished_at); the ledger deletes a task's earlier finish
-- when it writes a new one, so a task keeps one row.

SET LOCAL timezone = 'UTC';

CREATE UNIQUE INDEX IF NOT EXISTS provider_calls_key
    ON provider_calls (task_id, delivery, call_no, called_at);
CREATE UNIQUE INDEX IF NOT EXISTS tasks_key ON tasks (task_id, finished_at);

-- Every partition but the defaults, and the end of its range: the scheduler's
-- `ledger_partitions` duty drops those whose end is older than `ledger.retention`.
CREATE TABLE ledger_partitions (
    name   TEXT PRIMARY KEY,
    parent TEXT NOT NULL,
    upper  TIMESTAMPTZ NOT NULL
);

DO $$
DECLARE
    tbl text;
    col text;
    cutoff timestamptz;
    check_name text;
    stale text;
    ix record;
    def text[];
BEGIN
    FOR tbl, col IN VALUES ('provider_calls', 'called_at'), ('tasks', 'finished_at') LOOP
        -- The CHECK `Ledger::migrate` validated, if it is still a day ahead; without one
        -- (a new ledger), the attach below checks the rows itself, under the lock.
        SELECT conname, to_timestamp(right(conname, 8), 'YYYYMMDD')
            INTO check_name, cutoff
            FROM pg_constraint
            WHERE conrelid = tbl::regclass AND conname LIKE tbl || '_before_%' AND convalidated
            ORDER BY conname DESC LIMIT 1;
        IF cutoff IS NULL OR cutoff < now() + interval '1 day' THEN
            EXECUTE format('SELECT date_trunc(''month'', greatest(now() + interval ''7 days'',
                (SELECT max(%I) FROM %I))) + interval ''1 month''', col, tbl) INTO cutoff;
            check_name := NULL;
        END IF;
        FOR stale IN
            SELECT conname FROM pg_constraint
            WHERE conrelid = tbl::regclass AND conname LIKE tbl || '_before_%'
                AND conname IS DISTINCT FROM check_name
        LOOP
            EXECUTE format('ALTER TABLE %I DROP CONSTRAINT %I', tbl, stale);
        END LOOP;

        EXECUTE format('ALTER TABLE %I RENAME TO %I', tbl, tbl || '_legacy');
        EXECUTE format('CREATE TABLE %I (LIKE %I INCLUDING DEFAULTS) PARTITION BY RANGE (%I)',
            tbl, tbl || '_legacy', col);
        -- The old key (without the time) goes: a partition must not refuse what its parent
        -- takes.
        EXECUTE format('ALTER TABLE %I DROP CONSTRAINT %I', tbl || '_legacy', tbl || '_pkey');
        -- Each index of the old table becomes the parent's, under its name; attaching the old
        -- table attaches its index to it (the same definition), so nothing is built again.
        FOR ix IN
            SELECT c.relname AS name, pg_get_indexdef(i.indexrelid) AS def
            FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
            WHERE i.indrelid = (tbl || '_legacy')::regclass
        LOOP
            EXECUTE format('ALTER INDEX %I RENAME TO %I', ix.name, ix.name || '_legacy');
            def := regexp_match(ix.def, '^CREATE (UNIQUE )?INDEX \S+ ON \S+ (USING .*)$');
            EXECUTE format('CREATE %sINDEX %I ON %I %s', coalesce(def[1], ''), ix.name, tbl, def[2]);
        END LOOP;
        EXECUTE format('ALTER TABLE %I ATTACH PARTITION %I FOR VALUES FROM (MINVALUE) TO (%L)',
            tbl, tbl || '_legacy', cutoff);
        IF check_name IS NOT NULL THEN
            EXECUTE format('ALTER TABLE %I DROP CONSTRAINT %I', tbl || '_legacy', check_name);
        END IF;
        -- A row no partition takes yet (a clock far ahead, a scheduler down for months) is
        -- kept here, and moved when its month gets a partition.
        EXECUTE format('CREATE TABLE %I PARTITION OF %I DEFAULT', tbl || '_default', tbl);
        INSERT INTO ledger_partitions VALUES (tbl || '_legacy', tbl, cutoff);
    END LOOP;
END $$;

-- The rollup triggers move to the parents (a statement trigger there sees the rows of every
-- partition); the old tables' go.
DROP TRIGGER provider_calls_roll_insert ON provider_calls_legacy;
DROP TRIGGER provider_calls_roll_update ON provider_calls_legacy;
DROP TRIGGER provider_calls_roll_delete ON provider_calls_legacy;
DROP TRIGGER tasks_roll_insert ON tasks_legacy;
DROP TRIGGER tasks_roll_update ON tasks_legacy;
DROP TRIGGER tasks_roll_delete ON tasks_legacy;

-- Functions of a table's row type are bound to the old table's type (now `tasks_legacy`):
-- the same functions again, of the new parents' types. Their bodies are unchanged from
-- 20261126000001_rollups.sql and 20261126000002_routing_rollups.sql.
DROP FUNCTION ledger_roll_tasks(tasks_legacy[], tasks_legacy[]);
DROP FUNCTION ledger_tell_calls(tasks_legacy[], tasks_legacy[]);
DROP FUNCTION ledger_task_counts(tasks_legacy);
DROP FUNCTION ledger_task_succeeded(tasks_legacy);
DROP FUNCTION ledger_roll_calls(provider_calls_legacy[], provider_calls_legacy[]);
DROP FUNCTION ledger_roll_routing(provider_calls_legacy[], provider_calls_legacy[]);
DROP FUNCTION ledger_call_counts(provider_calls_legacy);
DROP FUNCTION ledger_call_succeeded(provider_calls_legacy);

CREATE FUNCTION ledger_task_counts(t tasks) RETURNS boolean LANGUAGE sql IMMUTABLE AS $$
    SELECT t.status IN ('succeeded', 'dead', 'failed')
        AND coalesce(t.error_class, 'fatal') IN ('fatal', 'retryable')
$$;

CREATE FUNCTION ledger_task_succeeded(t tasks) RETURNS boolean LANGUAGE sql IMMUTABLE AS $$
    SELECT t.status = 'succeeded' AND t.verdict IS NOT FALSE
$$;

CREATE FUNCTION ledger_call_counts(c provider_calls) RETURNS boolean LANGUAGE sql IMMUTABLE AS $$
    SELECT c.outcome = 'ok' OR (c.outcome = 'error' AND c.error_class IN ('fatal', 'retryable'))
$$;

CREATE FUNCTION ledger_call_succeeded(c provider_calls) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT c.outcome = 'ok' AND (c.task_status IS NULL OR c.task_status = 'succeeded')
        AND c.task_verdict IS NOT FALSE
$$;

CREATE FUNCTION ledger_roll_calls(added provider_calls[], removed provider_calls[])
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
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

CREATE FUNCTION ledger_roll_tasks(added tasks[], removed tasks[])
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
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

-- Unchanged but for how the calls are found. The join alone was planned as a hash join over a
-- sequential scan of every partition wherever the planner had no statistics yet (a new or
-- freshly partitioned ledger: 1.3 ms a call in bench=e2e_mock). `c.task_id = ANY(...)` makes
-- each partition one index lookup per task whatever the statistics say; the join compares the
-- ids as text so that it cannot become an index lookup per task per array element as well
-- (N² lookups, 0.6 ms a call), and is a hash join over what the lookups found.
CREATE FUNCTION ledger_tell_calls(tasks_now tasks[], tasks_gone tasks[]) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF cardinality(tasks_now) > 0 THEN
        UPDATE provider_calls c SET task_status = t.status, task_verdict = t.verdict,
            task_risk = t.risk
        FROM unnest(tasks_now) t
        WHERE c.task_id::text = t.task_id::text
          AND c.task_id = ANY(ARRAY(SELECT n.task_id FROM unnest(tasks_now) n))
          AND (c.task_status, c.task_verdict, c.task_risk)
              IS DISTINCT FROM (t.status, t.verdict, t.risk);
    END IF;
    IF cardinality(tasks_gone) > 0 THEN
        UPDATE provider_calls c SET task_status = NULL, task_verdict = NULL, task_risk = NULL
        FROM unnest(tasks_gone) g
        WHERE c.task_id::text = g.task_id::text
          AND c.task_id = ANY(ARRAY(SELECT n.task_id FROM unnest(tasks_gone) n))
          AND (c.task_status IS NOT NULL OR c.task_verdict IS NOT NULL OR c.task_risk IS NOT NULL);
    END IF;
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

-- Makes the monthly partitions of both tables up to `horizon`, each with the rows the
-- default partition holds for its month. Idempotent, and safe from two sessions at once.
CREATE FUNCTION ledger_make_partitions(horizon timestamptz) RETURNS integer
LANGUAGE plpgsql SET timezone = 'UTC' AS $$
DECLARE
    tbl text;
    col text;
    lo timestamptz;
    part text;
    made integer := 0;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('llmq ledger_partitions'));
    FOR tbl, col IN VALUES ('provider_calls', 'called_at'), ('tasks', 'finished_at') LOOP
        SELECT max(upper) INTO lo FROM ledger_partitions WHERE parent = tbl;
        WHILE lo < horizon LOOP
            part := tbl || '_' || to_char(lo, 'YYYY_MM');
            -- Writers into the default partition wait for the move (a moment): a row they
            -- put there for this month meanwhile would make the attach fail.
            EXECUTE format('LOCK TABLE %I IN EXCLUSIVE MODE', tbl || '_default');
            EXECUTE format('CREATE TABLE %I (LIKE %I INCLUDING DEFAULTS)', part, tbl);
            -- Moved, not changed: statements on a partition fire none of the parent's
            -- rollup triggers.
            EXECUTE format('WITH moved AS (DELETE FROM %I WHERE %I >= $1 AND %I < $2
                RETURNING *) INSERT INTO %I SELECT * FROM moved',
                tbl || '_default', col, col, part)
                USING lo, lo + interval '1 month';
            EXECUTE format('ALTER TABLE %I ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                tbl, part, lo, lo + interval '1 month');
            INSERT INTO ledger_partitions VALUES (part, tbl, lo + interval '1 month');
            lo := lo + interval '1 month';
            made := made + 1;
        END LOOP;
    END LOOP;
    RETURN made;
END $$;

-- Drops every partition whose range ends at or before `before`; returns their names. The
-- scheduler gives now less `ledger.retention` (at least a day), so the current month's range,
-- which ends after now, never does.
CREATE FUNCTION ledger_drop_partitions(before timestamptz) RETURNS SETOF text
LANGUAGE plpgsql AS $$
DECLARE
    part text;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('llmq ledger_partitions'));
    FOR part IN
        SELECT name FROM ledger_partitions WHERE upper <= before ORDER BY upper
    LOOP
        EXECUTE format('DROP TABLE %I', part);
        DELETE FROM ledger_partitions WHERE name = part;
        RETURN NEXT part;
    END LOOP;
END $$;

SELECT ledger_make_partitions(now() + interval '3 months');

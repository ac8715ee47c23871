-- The rollup triggers read their statement's transition tables directly (issue 33's write
-- path). Each used to copy `new_rows` and `old_rows` into arrays of composite rows, then call
-- three or four plpgsql functions that unnested those arrays once per rollup. Now each trigger
-- function sums its rows straight from the transition tables, one statement per rollup, and
-- returns at once when its statement changed no row (an `INSERT ... ON CONFLICT DO UPDATE`
-- fires the update triggers too, an upsert that inserted everything fires them with no rows).
--
-- What each rollup sums is unchanged from the migrations before (20261126000001 to
-- 20261130000001): no row is rewritten, the sums go on from where they stand.
--
-- A trigger with transition tables fires for one event only, so there are three functions per
-- table, alike but for the rows they read: inserted rows count +1, deleted rows -1, an update
-- both. They are made below from one text per rollup, so that what a rollup sums is written
-- once. In each text `%1$s` is the statement's rows, signed (`s`), with whether the row counts
-- for routing and whether it succeeded (`counts`, `ok`); `%2$s` is the rows it added.

LOCK TABLE provider_calls, tasks IN SHARE ROW EXCLUSIVE MODE;

DO $migration$
DECLARE
    call_rollup CONSTANT text := $sql$
    WITH c AS (%1$s)
    INSERT INTO call_rollups AS r
    SELECT (c.called_at AT TIME ZONE 'UTC')::date, c.queue, c.provider, c.model, c.task_type,
        (pg_backend_pid() %% 16)::smallint,
        sum(c.s * (c.outcome NOT IN ('unsent', 'cached'))::int), sum(c.s * c.input_tokens),
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
$sql$;

    routing_rollup CONSTANT text := $sql$
    WITH c AS (%1$s), b AS (
        SELECT (c.called_at AT TIME ZONE 'UTC')::date AS day, c.queue, c.provider, c.model,
            c.task_type, coalesce(c.task_risk, '') AS risk,
            CASE WHEN c.outcome = 'ok' THEN ledger_latency_bucket(c.latency_ms) END AS bucket,
            sum(c.s) AS tries, coalesce(sum(c.s) FILTER (WHERE c.ok), 0) AS successes
        FROM c WHERE c.counts GROUP BY 1, 2, 3, 4, 5, 6, 7
    )
    INSERT INTO routing_rollups AS r
    SELECT b.day, b.queue, b.provider, b.model, b.task_type, b.risk,
        (pg_backend_pid() %% 16)::smallint, sum(b.tries), sum(b.successes),
        ledger_hist_of(array_agg(b.bucket), array_agg(b.tries))
    FROM b GROUP BY 1, 2, 3, 4, 5, 6 ORDER BY 1, 2, 3, 4, 5, 6
    ON CONFLICT (day, queue, provider, model, task_type, risk, shard) DO UPDATE SET
        tries = r.tries + EXCLUDED.tries,
        successes = r.successes + EXCLUDED.successes,
        latency = ledger_hist_add(r.latency, EXCLUDED.latency);
$sql$;

    task_rollup CONSTANT text := $sql$
    WITH t AS (%1$s)
    INSERT INTO task_rollups AS r
    SELECT (t.finished_at AT TIME ZONE 'UTC')::date, t.queue, coalesce(t.provider, ''),
        coalesce(t.model, ''), t.task_type, coalesce(t.risk, ''),
        (pg_backend_pid() %% 16)::smallint,
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
$sql$;

    -- A chain's row from its calls or its tasks; most statements carry no chain's row, and
    -- then group nothing. `%1$s` here is what each row adds to its chain.
    chain_costs CONSTANT text := $sql$
    IF EXISTS (SELECT FROM (%1$s) x) THEN
        INSERT INTO chain_costs AS r
        SELECT c.chain_id,
            coalesce(min((c.at AT TIME ZONE 'UTC')::date) FILTER (WHERE c.s = 1),
                min((c.at AT TIME ZONE 'UTC')::date)),
            sum(c.s * c.calls), sum(c.s * c.tasks), sum(c.s * c.input_tokens),
            sum(c.s * c.output_tokens), sum(c.s * c.cached_tokens), sum(c.s * c.cost_usd),
            coalesce(sum(c.s * c.saved), 0)
        FROM (%1$s) c GROUP BY 1 ORDER BY 1
        -- A removed row was added before, on or after its chain's first day: `least` keeps it.
        ON CONFLICT (chain_id) DO UPDATE SET
            first_day = least(r.first_day, EXCLUDED.first_day),
            calls = r.calls + EXCLUDED.calls,
            tasks = r.tasks + EXCLUDED.tasks,
            input_tokens = r.input_tokens + EXCLUDED.input_tokens,
            output_tokens = r.output_tokens + EXCLUDED.output_tokens,
            cached_tokens = r.cached_tokens + EXCLUDED.cached_tokens,
            cost_usd = r.cost_usd + EXCLUDED.cost_usd,
            batch_saved_usd = r.batch_saved_usd + EXCLUDED.batch_saved_usd;
    END IF;
$sql$;
    call_chain CONSTANT text := $sql$
        SELECT c.s, c.chain_id, c.called_at AS at,
            (c.outcome NOT IN ('unsent', 'cached'))::int AS calls, 0 AS tasks, c.input_tokens,
            c.output_tokens, c.cached_tokens, c.cost_usd, c.list_cost_usd - c.cost_usd AS saved
        FROM (%1$s) c WHERE c.chain_id IS NOT NULL
$sql$;
    task_chain CONSTANT text := $sql$
        SELECT t.s, t.chain_id, t.finished_at AS at, 0 AS calls, 1 AS tasks, 0 AS input_tokens,
            0 AS output_tokens, 0 AS cached_tokens, 0 AS cost_usd, 0 AS saved
        FROM (%1$s) t WHERE t.chain_id IS NOT NULL
$sql$;

    queues CONSTANT text := $sql$
    INSERT INTO ledger_queues SELECT DISTINCT queue FROM %2$s ORDER BY 1 ON CONFLICT DO NOTHING;
$sql$;

    -- A task written or judged: its calls carry its status, verdict and risk (a deleted task's
    -- calls carry none again), only where they differ. Each partition is one index lookup per
    -- task (`= ANY`); the ids are joined as text, by a hash, so that the join is not a lookup
    -- per task per id as well (see 20261127000001_partitions.sql). The task functions run
    -- with `enable_seqscan` off: the planner cannot see how many ids the array holds, and on
    -- a partition of millions of rows it chose a sequential scan that compared every row
    -- with every id (one statement of 250,000 tasks ran for more than 8 minutes at 10
    -- million calls, where the index does it in seconds; a finisher's batch of a few tasks
    -- read the whole partition).
    tell_calls CONSTANT text := $sql$
    UPDATE provider_calls c SET task_status = t.status, task_verdict = t.verdict,
        task_risk = t.risk
    FROM new_rows t
    WHERE c.task_id::text = t.task_id::text
      AND c.task_id = ANY(ARRAY(SELECT n.task_id FROM new_rows n))
      AND (c.task_status, c.task_verdict, c.task_risk) IS DISTINCT FROM (t.status, t.verdict, t.risk);
$sql$;
    untell_calls CONSTANT text := $sql$
    UPDATE provider_calls c SET task_status = NULL, task_verdict = NULL, task_risk = NULL
    FROM old_rows g
    WHERE c.task_id::text = g.task_id::text
      AND c.task_id = ANY(ARRAY(SELECT o.task_id FROM old_rows o))
      AND (c.task_status IS NOT NULL OR c.task_verdict IS NOT NULL OR c.task_risk IS NOT NULL);
$sql$;

    call_added CONSTANT text := 'SELECT 1 AS s, ledger_call_counts(n::provider_calls) AS counts,
        ledger_call_succeeded(n::provider_calls) AS ok, n.* FROM new_rows n';
    call_removed CONSTANT text := 'SELECT -1 AS s, ledger_call_counts(o::provider_calls) AS counts,
        ledger_call_succeeded(o::provider_calls) AS ok, o.* FROM old_rows o';
    task_added CONSTANT text := 'SELECT 1 AS s, ledger_task_counts(n::tasks) AS counts,
        ledger_task_succeeded(n::tasks) AS ok, n.* FROM new_rows n';
    task_removed CONSTANT text := 'SELECT -1 AS s, ledger_task_counts(o::tasks) AS counts,
        ledger_task_succeeded(o::tasks) AS ok, o.* FROM old_rows o';

    f record;
BEGIN
    FOR f IN
        SELECT * FROM (VALUES
            ('provider_calls_inserted', 'call', call_added, 'new_rows'),
            ('provider_calls_updated', 'call', call_added || ' UNION ALL ' || call_removed, 'new_rows'),
            ('provider_calls_deleted', 'call', call_removed, NULL),
            ('tasks_inserted', 'task', task_added, 'new_rows'),
            ('tasks_updated', 'task', task_added || ' UNION ALL ' || task_removed, 'new_rows'),
            ('tasks_deleted', 'task', task_removed, NULL)
        ) AS v(name, kind, rows, added)
    LOOP
        EXECUTE format(
            $fn$CREATE OR REPLACE FUNCTION %I() RETURNS trigger LANGUAGE plpgsql %s AS $body$
BEGIN
    IF NOT EXISTS (SELECT FROM (%s) x) THEN
        RETURN NULL;
    END IF;
    %s
    RETURN NULL;
END $body$$fn$,
            f.name,
            CASE f.kind WHEN 'task' THEN 'SET enable_seqscan = off' ELSE '' END,
            f.rows,
            CASE f.kind
                WHEN 'call' THEN
                    format(call_rollup, f.rows)
                    || format(routing_rollup, f.rows)
                    || format(chain_costs, format(call_chain, f.rows))
                ELSE
                    format(task_rollup, f.rows)
                    || format(chain_costs, format(task_chain, f.rows))
                    || CASE WHEN f.added IS NULL THEN untell_calls ELSE tell_calls END
            END
            || CASE WHEN f.added IS NULL THEN '' ELSE format(queues, NULL, f.added) END
        );
    END LOOP;
END $migration$;

-- What the triggers called before, called by nothing now.
DROP FUNCTION ledger_roll_calls(provider_calls[], provider_calls[]);
DROP FUNCTION ledger_roll_routing(provider_calls[], provider_calls[]);
DROP FUNCTION ledger_roll_tasks(tasks[], tasks[]);
DROP FUNCTION ledger_roll_chains(provider_calls[], provider_calls[], tasks[], tasks[]);
DROP FUNCTION ledger_tell_calls(tasks[], tasks[]);

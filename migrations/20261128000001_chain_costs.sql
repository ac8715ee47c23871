-- A chain's costs in one row, `chain_costs`, in place of `chain_rollups` (a row per day, chain
-- and shard). The report by chain lists the costliest chains begun in a range, each with its
-- whole cost: over per-day rows, finding them summed every chain of the range (166,000 in 30
-- days of a 5-million-call ledger: 1.1 s for the costs page), where here each day of the range
-- is one walk of `chain_costs_costliest` that stops after the first few rows.
--
-- `first_day` is the UTC day of the earliest call or finished task ever recorded for the
-- chain; a row removed later (a forgotten start, a task finished again) leaves it as it was.
-- Tasks outside chains have no row: the row every one of them shared per day was the hottest
-- of the rollups, and no report reads it (their calls are in `call_rollups`).

-- Writers wait while this runs (one pass over `chain_rollups`, which holds a row per chain and
-- day, not per call): a statement that began before it would otherwise run the old rollup
-- function into the table this drops, and fail.
LOCK TABLE provider_calls, tasks IN SHARE ROW EXCLUSIVE MODE;

CREATE TABLE chain_costs (
    chain_id        TEXT PRIMARY KEY,
    first_day       DATE NOT NULL,
    calls           BIGINT NOT NULL,
    tasks           BIGINT NOT NULL,
    input_tokens    BIGINT NOT NULL,
    output_tokens   BIGINT NOT NULL,
    cached_tokens   BIGINT NOT NULL,
    cost_usd        NUMERIC(30, 10) NOT NULL,
    batch_saved_usd NUMERIC(30, 10) NOT NULL
) WITH (fillfactor = 50);

-- One row a chain already summed: as many rows as chain-days, not calls.
INSERT INTO chain_costs
SELECT chain_id, min(day), sum(calls), sum(tasks), sum(input_tokens), sum(output_tokens),
    sum(cached_tokens), sum(cost_usd), sum(batch_saved_usd)
FROM chain_rollups WHERE chain_id <> '' GROUP BY chain_id;

CREATE INDEX chain_costs_costliest ON chain_costs (first_day, cost_usd DESC);

DROP TABLE chain_rollups;

-- Adds `added` to the chains' rows and takes `removed` away, keys in order.
CREATE FUNCTION ledger_roll_chains(
    added_calls provider_calls[], removed_calls provider_calls[],
    added_tasks tasks[], removed_tasks tasks[]
) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    -- Most statements carry no chain's row: nothing to group then (120 µs a statement).
    IF NOT EXISTS (
        SELECT FROM unnest(added_calls) a WHERE a.chain_id IS NOT NULL
        UNION ALL SELECT FROM unnest(removed_calls) o WHERE o.chain_id IS NOT NULL
        UNION ALL SELECT FROM unnest(added_tasks) a WHERE a.chain_id IS NOT NULL
        UNION ALL SELECT FROM unnest(removed_tasks) o WHERE o.chain_id IS NOT NULL
    ) THEN
        RETURN;
    END IF;
    WITH c AS (
        SELECT 1 AS s, a.chain_id, a.called_at AS at, (a.outcome <> 'unsent')::int AS calls,
            0 AS tasks, a.input_tokens, a.output_tokens, a.cached_tokens, a.cost_usd,
            a.list_cost_usd - a.cost_usd AS saved
        FROM unnest(added_calls) a WHERE a.chain_id IS NOT NULL
        UNION ALL
        SELECT -1, o.chain_id, o.called_at, (o.outcome <> 'unsent')::int, 0, o.input_tokens,
            o.output_tokens, o.cached_tokens, o.cost_usd, o.list_cost_usd - o.cost_usd
        FROM unnest(removed_calls) o WHERE o.chain_id IS NOT NULL
        UNION ALL
        SELECT 1, a.chain_id, a.finished_at, 0, 1, 0, 0, 0, 0, 0
        FROM unnest(added_tasks) a WHERE a.chain_id IS NOT NULL
        UNION ALL
        SELECT -1, o.chain_id, o.finished_at, 0, 1, 0, 0, 0, 0, 0
        FROM unnest(removed_tasks) o WHERE o.chain_id IS NOT NULL
    )
    INSERT INTO chain_costs AS r
    SELECT c.chain_id,
        coalesce(min((c.at AT TIME ZONE 'UTC')::date) FILTER (WHERE c.s = 1),
            min((c.at AT TIME ZONE 'UTC')::date)),
        sum(c.s * c.calls), sum(c.s * c.tasks), sum(c.s * c.input_tokens),
        sum(c.s * c.output_tokens), sum(c.s * c.cached_tokens), sum(c.s * c.cost_usd),
        coalesce(sum(c.s * c.saved), 0)
    FROM c GROUP BY 1 ORDER BY 1
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
END $$;

-- The calls' and the tasks' rollups as before, their chains now summed by the function above.
CREATE OR REPLACE FUNCTION ledger_roll_calls(added provider_calls[], removed provider_calls[])
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

    PERFORM ledger_roll_chains(added, removed, '{}', '{}');

    INSERT INTO ledger_queues SELECT DISTINCT queue FROM unnest(added) ORDER BY 1
    ON CONFLICT DO NOTHING;
END $$;

CREATE OR REPLACE FUNCTION ledger_roll_tasks(added tasks[], removed tasks[])
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

    PERFORM ledger_roll_chains('{}', '{}', added, removed);

    INSERT INTO ledger_queues SELECT DISTINCT queue FROM unnest(added) ORDER BY 1
    ON CONFLICT DO NOTHING;
END $$;


-- Answers from the answer cache (issue 36): a task answered from it has a row in
-- provider_calls with outcome `cached`, no tokens, cost 0 and as list cost what the call it
-- reuses cost, so what the cache saved is in `batch_saved_usd` (reported as saved) with the
-- batches' and prompt caching's savings. Such a row is not a call: the rollups count calls as
-- before but for it. Routing's rollups read only `ok` and `error` rows, so a hit tells them
-- nothing about a model.
-- Only the two functions change: no row is rewritten.

CREATE OR REPLACE FUNCTION ledger_roll_chains(
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
        SELECT 1 AS s, a.chain_id, a.called_at AS at, (a.outcome NOT IN ('unsent', 'cached'))::int AS calls,
            0 AS tasks, a.input_tokens, a.output_tokens, a.cached_tokens, a.cost_usd,
            a.list_cost_usd - a.cost_usd AS saved
        FROM unnest(added_calls) a WHERE a.chain_id IS NOT NULL
        UNION ALL
        SELECT -1, o.chain_id, o.called_at, (o.outcome NOT IN ('unsent', 'cached'))::int, 0, o.input_tokens,
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

    PERFORM ledger_roll_chains(added, removed, '{}', '{}');

    INSERT INTO ledger_queues SELECT DISTINCT queue FROM unnest(added) ORDER BY 1
    ON CONFLICT DO NOTHING;
END $$;

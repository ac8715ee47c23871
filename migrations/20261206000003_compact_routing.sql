-- Folds the shards of each routing rollup of the days before `before` into one row
-- (issue 68). Rolls and triggers add to the row of their session's shard (pg_backend_pid()
-- % 16), so a day's key holds up to 16 rows, and rows that a change took away from add up to
-- zero. `llmq migrate` on a ledger upgraded from a release before rollups left 5 times the
-- rows a ledger filled since holds (copying each task's view to its calls moves each call
-- from one key to another, a batch at a time, from several sessions): routing stats, which
-- read every row of 30 days with its latency histogram, took 322 ms at 1M calls where the
-- same ledger filled fresh takes 63. Returns how many rows it folded. Safe beside rolls: a
-- roll that adds to a folded day meanwhile waits for the rows it meets, and its sums land
-- in a row of its own.
CREATE FUNCTION ledger_compact_routing(before date) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    gone routing_rollups[];
BEGIN
    WITH folded AS (
        DELETE FROM routing_rollups r
        WHERE r.day < before
          AND (r.day, r.queue, r.provider, r.model, r.task_type, r.risk) IN (
            SELECT day, queue, provider, model, task_type, risk FROM routing_rollups
            WHERE day < before
            GROUP BY 1, 2, 3, 4, 5, 6
            HAVING count(*) > 1 OR sum(tries) = 0)
        RETURNING r.*
    )
    SELECT array_agg(f) INTO gone FROM folded f;
    IF gone IS NULL THEN
        RETURN 0;
    END IF;
    INSERT INTO routing_rollups AS r
    SELECT g.day, g.queue, g.provider, g.model, g.task_type, g.risk, 0::smallint,
        sum(g.tries), sum(g.successes), ledger_hist_sum(g.latency)
    FROM unnest(gone) g
    GROUP BY 1, 2, 3, 4, 5, 6
    HAVING sum(g.tries) <> 0 OR sum(g.successes) <> 0
    ORDER BY 1, 2, 3, 4, 5, 6
    ON CONFLICT (day, queue, provider, model, task_type, risk, shard) DO UPDATE SET
        tries = r.tries + EXCLUDED.tries,
        successes = r.successes + EXCLUDED.successes,
        latency = ledger_hist_add(r.latency, EXCLUDED.latency);
    RETURN cardinality(gone);
END $$;

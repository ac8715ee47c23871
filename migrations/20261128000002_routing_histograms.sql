-- Faster latency histograms for learned routing (20261126000002_routing_rollups.sql): what
-- bench=e2e_mock and bench=ledger_scale showed them costing.
--
-- A statement's calls were added to a key's histogram one call at a time (`ledger_hist`, a
-- plpgsql step per row); they are now counted per key and bucket by SQL's own sum and made
-- into one histogram per key (`ledger_hist_of`). Two histograms are added in one loop over
-- their buckets instead of an unnest, a sort and an array_agg: half the time, in the
-- trigger (on conflict) and in `routing_stats`' read alike.

-- A histogram of 160 buckets from its sparse counts: bucket `buckets[i]` holds `ns[i]`
-- (NULL buckets are left out).
CREATE FUNCTION ledger_hist_of(buckets integer[], ns bigint[]) RETURNS bigint[]
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    h bigint[] := array_fill(0::bigint, ARRAY[160]);
BEGIN
    FOR i IN 1 .. coalesce(cardinality(buckets), 0) LOOP
        IF buckets[i] IS NOT NULL AND ns[i] IS NOT NULL THEN
            h[buckets[i] + 1] := h[buckets[i] + 1] + ns[i];
        END IF;
    END LOOP;
    RETURN h;
END $$;

CREATE OR REPLACE FUNCTION ledger_roll_routing(added provider_calls[], removed provider_calls[])
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF cardinality(added) + cardinality(removed) = 0 THEN
        RETURN;
    END IF;
    WITH c AS (
        SELECT 1 AS s, ledger_call_succeeded(a) AS ok, a.* FROM unnest(added) a
        WHERE ledger_call_counts(a)
        UNION ALL
        SELECT -1, ledger_call_succeeded(o), o.* FROM unnest(removed) o
        WHERE ledger_call_counts(o)
    ), b AS (
        SELECT (c.called_at AT TIME ZONE 'UTC')::date AS day, c.queue, c.provider, c.model,
            c.task_type, coalesce(c.task_risk, '') AS risk,
            CASE WHEN c.outcome = 'ok' THEN ledger_latency_bucket(c.latency_ms) END AS bucket,
            sum(c.s) AS tries, coalesce(sum(c.s) FILTER (WHERE c.ok), 0) AS successes
        FROM c GROUP BY 1, 2, 3, 4, 5, 6, 7
    )
    INSERT INTO routing_rollups AS r
    SELECT b.day, b.queue, b.provider, b.model, b.task_type, b.risk,
        (pg_backend_pid() % 16)::smallint, sum(b.tries), sum(b.successes),
        ledger_hist_of(array_agg(b.bucket), array_agg(b.tries))
    FROM b GROUP BY 1, 2, 3, 4, 5, 6 ORDER BY 1, 2, 3, 4, 5, 6
    ON CONFLICT (day, queue, provider, model, task_type, risk, shard) DO UPDATE SET
        tries = r.tries + EXCLUDED.tries,
        successes = r.successes + EXCLUDED.successes,
        latency = ledger_hist_add(r.latency, EXCLUDED.latency);
END $$;

CREATE OR REPLACE FUNCTION ledger_hist_add(a bigint[], b bigint[]) RETURNS bigint[]
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF a IS NULL THEN
        RETURN b;
    ELSIF b IS NULL THEN
        RETURN a;
    END IF;
    FOR i IN 1 .. greatest(cardinality(a), cardinality(b)) LOOP
        a[i] := coalesce(a[i], 0) + coalesce(b[i], 0);
    END LOOP;
    RETURN a;
END $$;

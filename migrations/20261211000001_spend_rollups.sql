-- Spend by tenant and by tag, summed as the other rollups are (20261204000001): by the roll
-- that sums a row and by the triggers that move a summed row. A call or finished task with a
-- `tenant` adds to the row of its tenant with no tag (`tag` = ''), and each of its `tags` to
-- the row of that tenant ('' for none), tag name and value; one with neither adds nothing.
-- So `tag = ''` holds every tenant's whole spend, `tag = 'team'` the spend of each team; what
-- had no tenant (or no `team`) is the rest of the rollups' total, which the reports take as
-- the difference. Rows summed before this migration count as having neither: nothing is
-- read from the ledger's rows here, and it takes no longer on a populated ledger than on an
-- empty one.
--
-- Rows with neither are left out before the function is called: most rows, in a ledger whose
-- producers set neither, and a roll of them costs what it cost before.
--
-- The task side carries what `llmq insights` reads from `task_rollups` (`counted`,
-- `successes`, `counted_cost_usd`, `durations`, `duration_ms`), so a tenant's insights come
-- from here too; not `risk`, which no report of spend asks for.

-- The writers wait the few milliseconds this takes: no summed row moves while the functions
-- that sum them are replaced, so none is summed into one rollup and not the other. (Named in
-- the writers' order, tasks first; `llmq migrate` warns of a long wait only for the
-- migrations that lock `provider_calls, tasks` to read them.)
LOCK TABLE tasks, provider_calls IN SHARE ROW EXCLUSIVE MODE;
SELECT FROM ledger_rolled WHERE one FOR UPDATE;

CREATE TABLE spend_rollups (
    day              DATE NOT NULL,
    tenant           TEXT NOT NULL,
    tag              TEXT NOT NULL,
    value            TEXT NOT NULL,
    queue            TEXT NOT NULL,
    provider         TEXT NOT NULL,
    model            TEXT NOT NULL,
    task_type        TEXT NOT NULL,
    shard            SMALLINT NOT NULL,
    calls            BIGINT NOT NULL DEFAULT 0,
    input_tokens     BIGINT NOT NULL DEFAULT 0,
    output_tokens    BIGINT NOT NULL DEFAULT 0,
    cached_tokens    BIGINT NOT NULL DEFAULT 0,
    cost_usd         NUMERIC(30, 10) NOT NULL DEFAULT 0,
    batch_saved_usd  NUMERIC(30, 10) NOT NULL DEFAULT 0,
    tasks            BIGINT NOT NULL DEFAULT 0,
    counted          BIGINT NOT NULL DEFAULT 0,
    successes        BIGINT NOT NULL DEFAULT 0,
    counted_cost_usd NUMERIC(30, 10) NOT NULL DEFAULT 0,
    durations        BIGINT NOT NULL DEFAULT 0,
    duration_ms      BIGINT NOT NULL DEFAULT 0,
    -- Reports read one tag (or none) of a range of days, and a tenant's within it.
    PRIMARY KEY (tag, day, tenant, value, queue, provider, model, task_type, shard)
) WITH (fillfactor = 50);

-- The same sums by day alone, for the reports over every tenant: `tag` '' with the tenant as
-- `value` (spend by tenant), else the tag's value, summed over the tenants (spend by tag).
-- Tens of rows a day where `spend_rollups` has thousands, so `llmq costs --by tenant` and
-- `--by tag:NAME` read as few rows as the other reports do.
CREATE TABLE spend_days (
    day              DATE NOT NULL,
    tag              TEXT NOT NULL,
    value            TEXT NOT NULL,
    shard            SMALLINT NOT NULL,
    calls            BIGINT NOT NULL DEFAULT 0,
    input_tokens     BIGINT NOT NULL DEFAULT 0,
    output_tokens    BIGINT NOT NULL DEFAULT 0,
    cached_tokens    BIGINT NOT NULL DEFAULT 0,
    cost_usd         NUMERIC(30, 10) NOT NULL DEFAULT 0,
    batch_saved_usd  NUMERIC(30, 10) NOT NULL DEFAULT 0,
    tasks            BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (tag, day, value, shard)
) WITH (fillfactor = 50);

-- The groups a row adds to: its tenant's (no tag), and one per tag.
CREATE FUNCTION ledger_spend_keys(text, jsonb)
RETURNS TABLE (tenant text, tag text, value text) LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT $1, '', '' WHERE $1 IS NOT NULL
    UNION ALL
    SELECT coalesce($1, ''), t.key, t.value
    FROM jsonb_each_text(CASE jsonb_typeof($2) WHEN 'object' THEN $2 ELSE '{}' END) t
$$;

-- Each statement that moves `call_rollups` or `task_rollups` moves `spend_rollups` from the
-- same rows (`c` or `t`, signed by `s`), as a data-modifying CTE of its own: the roll and the
-- six triggers of 20261204000001, rewritten in place as 20261206000002 did; the migration
-- fails if a function does not hold its statements where that migration put them.
DO $migration$
DECLARE
    calls CONSTANT text := $sql$, spend AS (
    INSERT INTO spend_rollups AS r (day, tenant, tag, value, queue, provider, model, task_type,
        shard, calls, input_tokens, output_tokens, cached_tokens, cost_usd, batch_saved_usd)
    SELECT (c.called_at AT TIME ZONE 'UTC')::date, k.tenant, k.tag, k.value, c.queue,
        c.provider, c.model, c.task_type, (pg_backend_pid() % 16)::smallint,
        sum(c.s * (c.outcome NOT IN ('unsent', 'cached'))::int), sum(c.s * c.input_tokens),
        sum(c.s * c.output_tokens), sum(c.s * c.cached_tokens), sum(c.s * c.cost_usd),
        coalesce(sum(c.s * (c.list_cost_usd - c.cost_usd)), 0)
    FROM c CROSS JOIN LATERAL ledger_spend_keys(c.tenant, c.tags) k
    WHERE c.tenant IS NOT NULL OR c.tags IS NOT NULL
    GROUP BY 1, 2, 3, 4, 5, 6, 7, 8 ORDER BY 1, 2, 3, 4, 5, 6, 7, 8
    ON CONFLICT (tag, day, tenant, value, queue, provider, model, task_type, shard) DO UPDATE SET
        calls = r.calls + EXCLUDED.calls,
        input_tokens = r.input_tokens + EXCLUDED.input_tokens,
        output_tokens = r.output_tokens + EXCLUDED.output_tokens,
        cached_tokens = r.cached_tokens + EXCLUDED.cached_tokens,
        cost_usd = r.cost_usd + EXCLUDED.cost_usd,
        batch_saved_usd = r.batch_saved_usd + EXCLUDED.batch_saved_usd), days AS (
    INSERT INTO spend_days AS r (day, tag, value, shard, calls, input_tokens, output_tokens,
        cached_tokens, cost_usd, batch_saved_usd)
    SELECT (c.called_at AT TIME ZONE 'UTC')::date, k.tag,
        CASE WHEN k.tag = '' THEN k.tenant ELSE k.value END, (pg_backend_pid() % 16)::smallint,
        sum(c.s * (c.outcome NOT IN ('unsent', 'cached'))::int), sum(c.s * c.input_tokens),
        sum(c.s * c.output_tokens), sum(c.s * c.cached_tokens), sum(c.s * c.cost_usd),
        coalesce(sum(c.s * (c.list_cost_usd - c.cost_usd)), 0)
    FROM c CROSS JOIN LATERAL ledger_spend_keys(c.tenant, c.tags) k
    WHERE c.tenant IS NOT NULL OR c.tags IS NOT NULL
    GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
    ON CONFLICT (tag, day, value, shard) DO UPDATE SET
        calls = r.calls + EXCLUDED.calls,
        input_tokens = r.input_tokens + EXCLUDED.input_tokens,
        output_tokens = r.output_tokens + EXCLUDED.output_tokens,
        cached_tokens = r.cached_tokens + EXCLUDED.cached_tokens,
        cost_usd = r.cost_usd + EXCLUDED.cost_usd,
        batch_saved_usd = r.batch_saved_usd + EXCLUDED.batch_saved_usd)
    INSERT INTO call_rollups AS r$sql$;
    tasks CONSTANT text := $sql$, spend AS (
    INSERT INTO spend_rollups AS r (day, tenant, tag, value, queue, provider, model, task_type,
        shard, tasks, counted, successes, counted_cost_usd, durations, duration_ms)
    SELECT (t.finished_at AT TIME ZONE 'UTC')::date, k.tenant, k.tag, k.value, t.queue,
        coalesce(t.provider, ''), coalesce(t.model, ''), t.task_type,
        (pg_backend_pid() % 16)::smallint,
        sum(t.s),
        coalesce(sum(t.s) FILTER (WHERE t.counts), 0),
        coalesce(sum(t.s) FILTER (WHERE t.counts AND t.ok), 0),
        coalesce(sum(t.s * t.cost_usd) FILTER (WHERE t.counts), 0),
        coalesce(sum(t.s) FILTER (WHERE t.counts AND t.duration_ms IS NOT NULL), 0),
        coalesce(sum(t.s * t.duration_ms) FILTER (WHERE t.counts), 0)
    FROM t CROSS JOIN LATERAL ledger_spend_keys(t.tenant, t.tags) k
    WHERE t.tenant IS NOT NULL OR t.tags IS NOT NULL
    GROUP BY 1, 2, 3, 4, 5, 6, 7, 8 ORDER BY 1, 2, 3, 4, 5, 6, 7, 8
    ON CONFLICT (tag, day, tenant, value, queue, provider, model, task_type, shard) DO UPDATE SET
        tasks = r.tasks + EXCLUDED.tasks,
        counted = r.counted + EXCLUDED.counted,
        successes = r.successes + EXCLUDED.successes,
        counted_cost_usd = r.counted_cost_usd + EXCLUDED.counted_cost_usd,
        durations = r.durations + EXCLUDED.durations,
        duration_ms = r.duration_ms + EXCLUDED.duration_ms), days AS (
    INSERT INTO spend_days AS r (day, tag, value, shard, tasks)
    SELECT (t.finished_at AT TIME ZONE 'UTC')::date, k.tag,
        CASE WHEN k.tag = '' THEN k.tenant ELSE k.value END, (pg_backend_pid() % 16)::smallint,
        sum(t.s)
    FROM t CROSS JOIN LATERAL ledger_spend_keys(t.tenant, t.tags) k
    WHERE t.tenant IS NOT NULL OR t.tags IS NOT NULL
    GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
    ON CONFLICT (tag, day, value, shard) DO UPDATE SET tasks = r.tasks + EXCLUDED.tasks)
    INSERT INTO task_rollups AS r$sql$;
    f record;
    def text;
    stmt text;
    n integer;
BEGIN
    FOR f IN
        SELECT * FROM (VALUES
            ('ledger_roll', 'call'), ('ledger_roll', 'task'),
            ('provider_calls_inserted', 'call'), ('provider_calls_updated', 'call'),
            ('provider_calls_deleted', 'call'),
            ('tasks_inserted', 'task'), ('tasks_updated', 'task'), ('tasks_deleted', 'task')
        ) AS v(name, kind)
    LOOP
        def := pg_get_functiondef(f.name::regproc);
        stmt := CASE f.kind WHEN 'call' THEN 'INSERT INTO call_rollups AS r'
            ELSE 'INSERT INTO task_rollups AS r' END;
        n := (length(def) - length(replace(def, stmt, ''))) / length(stmt);
        IF n <> 1 OR position(')' || E'\n    ' || stmt IN def) = 0 THEN
            RAISE EXCEPTION '%() holds % statements `%` after its rows, not the one migration 20261204000001 wrote',
                f.name, n, stmt;
        END IF;
        EXECUTE replace(def, ')' || E'\n    ' || stmt,
            ')' || CASE f.kind WHEN 'call' THEN calls ELSE tasks END);
    END LOOP;
END $migration$;

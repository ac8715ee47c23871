-- The rollups are summed after the rows are written, not by the statement that writes them
-- (issue 33's write path). The statement triggers of 20261202000001 summed every statement's
-- rows into four rollups in the writer's transaction: about 40 µs of Postgres time a task at
-- `bench=e2e_mock` (0.72 cores against 0.55 with the triggers off, the same build), the whole
-- of the rollups' cost on the write path.
--
-- Now every row carries the transaction that wrote it (`written`, a transaction id as a
-- number). `ledger_rolled` holds a line (`upto`) and the transactions below it that were
-- still running when it was drawn (`pending`): a row is summed in the rollups when its
-- transaction is below the line and not pending (a `started` call never is, see below; a row
-- written before this migration, `written` NULL, was summed by the triggers before).
-- `ledger_roll()` moves the line: under the lock of `ledger_rolled`'s row it takes a
-- snapshot, in which every transaction below `xmax` has committed or aborted but those it
-- lists as running. It sums the rows of the transactions between the old line and the new
-- that are not running, and of the pending ones that have finished since, and keeps the
-- running ones as pending, all in one transaction: no row is skipped (a transaction still
-- running keeps its rows for a later roll) or summed twice (the line only moves up, with the
-- sums). A transaction left open holds back only its own rows, wherever it runs. A roll also
-- copies each new task's view (status, verdict, risk) to its calls before it sums them. The
-- scheduler rolls (`ledger_rollups`), and so does every report before it reads, so a report
-- counts every row committed before it.
--
-- What changes a summed row (a verdict, an earlier finish deleted, an operator's SQL) still
-- moves the rollups in its own statement, by the triggers below: they take away the old
-- versions that were summed and add the new ones that are, under a share lock of
-- `ledger_rolled`'s row, so a roll waits for them and they for a roll. The workers' own
-- writes do not take that path: a new row is written by the transaction itself, and a call's
-- completion replaces its `started` row, which is not summed, and sets `written` to the
-- completing transaction (`Ledger::write`). Their triggers find nothing to sum and return
-- before the lock.
--
-- A `started` call (made, its answer not yet written) is not summed, so a completion does not
-- take away what its start added: a started row that no worker ever completes (one SIGKILLed
-- during its call) is kept in `provider_calls` but counted in no rollup. Started rows written
-- before this migration were summed, and are treated as before.

LOCK TABLE provider_calls, tasks IN SHARE ROW EXCLUSIVE MODE;

-- No default at first: the rows already here keep NULL, which reads as summed.
ALTER TABLE provider_calls ADD COLUMN written int8;
ALTER TABLE tasks ADD COLUMN written int8;
ALTER TABLE provider_calls ALTER COLUMN written SET DEFAULT pg_current_xact_id()::text::int8;
ALTER TABLE tasks ALTER COLUMN written SET DEFAULT pg_current_xact_id()::text::int8;

-- A roll reads the rows above the line by a BRIN index: rows are appended in about the order
-- of their transactions, so each range of pages spans few of them, and the index costs a write
-- next to nothing (a B-tree entry per row is what 20261203000001 took away).
CREATE INDEX provider_calls_written ON provider_calls USING brin (written) WITH (autosummarize = on);
CREATE INDEX tasks_written ON tasks USING brin (written) WITH (autosummarize = on);

CREATE TABLE ledger_rolled (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    upto int8 NOT NULL,
    -- Transactions below `upto` that were still running at the last roll: their rows are
    -- not summed yet, and are the first time a roll finds them finished.
    pending int8[] NOT NULL DEFAULT '{}'
);
INSERT INTO ledger_rolled VALUES (true, 0, '{}');

DO $migration$
DECLARE
    -- What each rollup sums, as 20261202000001 wrote it: `%1$s` is the rows, signed (`s`),
    -- with whether each counts for routing and succeeded (`counts`, `ok`).
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
    INSERT INTO ledger_queues SELECT DISTINCT x.queue FROM (%1$s) x WHERE x.s = 1 ORDER BY 1
    ON CONFLICT DO NOTHING;
$sql$;

    -- A task's view copied to its calls, or taken away, as 20261203000002 left it.
    -- `%1$s` is the tasks whose view is copied.
    tell_calls CONSTANT text := $sql$
    UPDATE provider_calls c SET task_status = t.status, task_verdict = t.verdict,
        task_risk = t.risk
    FROM (%1$s) t
    WHERE c.task_id::text = t.task_id::text
      AND c.task_id = ANY(ARRAY(SELECT n.task_id FROM (%1$s) n))
      AND c.called_at >= (SELECT min(ledger_span_from(n.enqueued_at, n.finished_at)) FROM (%1$s) n)
      AND c.called_at < (SELECT max(ledger_span_until(n.finished_at)) FROM (%1$s) n)
      AND (c.task_status, c.task_verdict, c.task_risk) IS DISTINCT FROM (t.status, t.verdict, t.risk);
$sql$;
    untell_calls CONSTANT text := $sql$
    UPDATE provider_calls c SET task_status = NULL, task_verdict = NULL, task_risk = NULL
    FROM old_rows g
    WHERE c.task_id::text = g.task_id::text
      AND c.task_id = ANY(ARRAY(SELECT o.task_id FROM old_rows o))
      AND c.called_at >= (SELECT min(ledger_span_from(o.enqueued_at, o.finished_at)) FROM old_rows o)
      AND c.called_at < (SELECT max(ledger_span_until(o.finished_at)) FROM old_rows o)
      AND (c.task_status IS NOT NULL OR c.task_verdict IS NOT NULL OR c.task_risk IS NOT NULL);
$sql$;

    -- The rows of `%1$s` (a table, aliased `a`) signed `%2$s`, that `%3$s` selects. In the
    -- triggers that is the rows summed (below `lo`, the line); in a roll, those between the
    -- old line and the new.
    call_rows CONSTANT text := 'SELECT %2$s AS s, ledger_call_counts(a::provider_calls) AS counts,
        ledger_call_succeeded(a::provider_calls) AS ok, a.* FROM %1$s a WHERE %3$s';
    task_rows CONSTANT text := 'SELECT %2$s AS s, ledger_task_counts(a::tasks) AS counts,
        ledger_task_succeeded(a::tasks) AS ok, a.* FROM %1$s a WHERE %3$s';
    -- Summed: a call below the line that is not `started`, a task below the line, and what was
    -- written before the line existed.
    call_summed CONSTANT text := '(a.written IS NULL OR (a.written < lo AND a.written <> ALL (pend)
        AND a.outcome <> ''started''))';
    task_summed CONSTANT text := '(a.written IS NULL OR (a.written < lo AND a.written <> ALL (pend)))';
    -- What may be summed, known without the line: a row this transaction wrote is above it.
    call_maybe CONSTANT text := '(a.written IS NULL OR (a.written <> me AND a.outcome <> ''started''))';
    task_maybe CONSTANT text := '(a.written IS NULL OR a.written <> me)';
    -- Rolled: written by a transaction that was pending and has finished, or by one between
    -- the old line and the new that is not running.
    call_rolled CONSTANT text := '(((a.written >= lo AND a.written < hi AND a.written <> ALL (running))
        OR a.written = ANY (finished)) AND a.outcome <> ''started'')';
    task_rolled CONSTANT text := '((a.written >= lo AND a.written < hi AND a.written <> ALL (running))
        OR a.written = ANY (finished))';

    f record;
    summed text;
    maybe text;
BEGIN
    FOR f IN
        SELECT * FROM (VALUES
            ('provider_calls_inserted', 'call', true, false),
            ('provider_calls_updated', 'call', true, true),
            ('provider_calls_deleted', 'call', false, true),
            ('tasks_inserted', 'task', true, false),
            ('tasks_updated', 'task', true, true),
            ('tasks_deleted', 'task', false, true)
        ) AS v(name, kind, added, removed)
    LOOP
        summed := concat_ws(' UNION ALL ',
            CASE WHEN f.added THEN format(CASE f.kind WHEN 'call' THEN call_rows ELSE task_rows END,
                'new_rows', '1', CASE f.kind WHEN 'call' THEN call_summed ELSE task_summed END) END,
            CASE WHEN f.removed THEN format(CASE f.kind WHEN 'call' THEN call_rows ELSE task_rows END,
                'old_rows', '-1', CASE f.kind WHEN 'call' THEN call_summed ELSE task_summed END) END);
        maybe := concat_ws(' UNION ALL ',
            CASE WHEN f.added THEN format('SELECT FROM new_rows a WHERE %s',
                CASE f.kind WHEN 'call' THEN call_maybe ELSE task_maybe END) END,
            CASE WHEN f.removed THEN format('SELECT FROM old_rows a WHERE %s',
                CASE f.kind WHEN 'call' THEN call_maybe ELSE task_maybe END) END);
        EXECUTE format(
            $fn$CREATE OR REPLACE FUNCTION %I() RETURNS trigger LANGUAGE plpgsql %s AS $body$
DECLARE
    -- None when the statement changed no row (then nothing below is found either).
    me CONSTANT int8 := pg_current_xact_id_if_assigned()::text::int8;
    lo int8;
    pend int8[];
BEGIN
    IF EXISTS (%s) THEN
        -- The line, held still until this transaction ends: a roll waits for it.
        SELECT r.upto, r.pending INTO lo, pend FROM ledger_rolled r WHERE one FOR SHARE;
        IF EXISTS (SELECT FROM (%s) x) THEN
            %s
        END IF;
    END IF;
    %s
    RETURN NULL;
END $body$$fn$,
            f.name,
            -- No JIT: with sequential scans off a plan's cost passes `jit_above_cost`, and
            -- compiling it took 10-70 ms where the statement itself takes a fraction of one.
            CASE f.kind WHEN 'task' THEN 'SET jit = off SET enable_seqscan = off SET enable_nestloop = off'
                ELSE 'SET jit = off' END,
            maybe,
            summed,
            CASE f.kind
                WHEN 'call' THEN
                    format(call_rollup, summed) || format(routing_rollup, summed)
                    || format(chain_costs, format(call_chain, summed))
                ELSE
                    format(task_rollup, summed) || format(chain_costs, format(task_chain, summed))
            END
            || CASE WHEN f.added THEN format(queues, summed) ELSE '' END,
            -- A task's view is copied to its calls here when a task already written
            -- changes, and taken away when it goes; a new task's by the roll that sums it.
            CASE WHEN f.kind = 'call' OR NOT f.removed THEN ''
                WHEN f.added THEN format(tell_calls, 'SELECT * FROM new_rows')
                ELSE untell_calls END
        );
    END LOOP;

    EXECUTE format(
        $fn$CREATE FUNCTION ledger_roll() RETURNS int8 LANGUAGE plpgsql
            SET jit = off SET enable_seqscan = off SET enable_nestloop = off AS $body$
DECLARE
    lo int8;
    pend int8[];
    snap pg_snapshot;
    hi int8;
    running int8[];
    finished int8[];
    tasks boolean;
    calls boolean;
BEGIN
    -- First without the lock, which makes this a writing transaction: a report rolls before
    -- it reads, most often right after another roll, with nothing to sum. When no finished
    -- transaction has a row above the line, the rollups hold every committed row already.
    FOR i IN 1..2 LOOP
        IF i = 1 THEN
            SELECT r.upto, r.pending INTO lo, pend FROM ledger_rolled r WHERE one;
        ELSE
            SELECT r.upto, r.pending INTO lo, pend FROM ledger_rolled r WHERE one FOR UPDATE;
        END IF;
        -- Taken after the lock is ours, so no trigger that read the old line is still
        -- running. Every transaction below the snapshot's `xmax` has finished but those it
        -- lists as running (this roll's own is neither: it writes no ledger row).
        SELECT pg_current_snapshot() INTO snap;
        hi := greatest(lo, pg_snapshot_xmax(snap)::text::int8);
        running := ARRAY(SELECT x::text::int8 FROM pg_snapshot_xip(snap) x);
        finished := ARRAY(SELECT x FROM unnest(pend) x WHERE x <> ALL (running));
        tasks := EXISTS (SELECT FROM (%s) x);
        calls := EXISTS (SELECT FROM (%s) x);
        IF i = 1 AND NOT tasks AND NOT calls THEN
            RETURN lo;
        END IF;
    END LOOP;
    -- Each table's rollups only when it has rows to sum. The tasks first: their view is
    -- copied to their calls (those already summed move the rollups by their trigger), so
    -- that the calls summed next carry it.
    IF tasks THEN
        %s
    END IF;
    IF calls THEN
        %s
    END IF;
    UPDATE ledger_rolled SET upto = hi,
        pending = ARRAY(SELECT x FROM unnest(running) x WHERE x >= lo OR x = ANY (pend) ORDER BY 1);
    RETURN hi;
END $body$$fn$,
        format(task_rows, 'tasks', '1', task_rolled),
        format(call_rows, 'provider_calls', '1', call_rolled),
        format(tell_calls, format(task_rows, 'tasks', '1', task_rolled))
        || format(task_rollup, format(task_rows, 'tasks', '1', task_rolled))
        || format(chain_costs, format(task_chain, format(task_rows, 'tasks', '1', task_rolled)))
        || format(queues, format(task_rows, 'tasks', '1', task_rolled)),
        format(call_rollup, format(call_rows, 'provider_calls', '1', call_rolled))
        || format(routing_rollup, format(call_rows, 'provider_calls', '1', call_rolled))
        || format(chain_costs, format(call_chain, format(call_rows, 'provider_calls', '1', call_rolled)))
        || format(queues, format(call_rows, 'provider_calls', '1', call_rolled))
    );
END $migration$;

-- A month is summed before it is dropped: what it holds above the line would be lost.
CREATE OR REPLACE FUNCTION ledger_drop_partitions(before timestamptz) RETURNS SETOF text
LANGUAGE plpgsql AS $$
DECLARE
    part text;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('llmq ledger_partitions'));
    PERFORM ledger_roll();
    FOR part IN
        SELECT name FROM ledger_partitions WHERE upper <= before ORDER BY upper
    LOOP
        EXECUTE format('DROP TABLE %I', part);
        DELETE FROM ledger_partitions WHERE name = part;
        RETURN NEXT part;
    END LOOP;
END $$;

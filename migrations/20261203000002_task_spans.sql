-- What finds a task's rows by its id looks only in the partitions of the task's life.
--
-- The ledger finds a batch's rows by task id in three places on every finisher write: the
-- delete of the tasks' earlier finishes (`Ledger::write`), and the task triggers, which copy
-- a task's view to its calls (and take it away when the task's row goes). A task id is one
-- index lookup in each partition, and nothing said which partition holds a task's rows, so
-- each id was looked up in every month the ledger keeps, the months made ahead and the
-- default partition: 4 partitions on a new ledger, 17 at `ledger.retention: 400d`. The write
-- cost grew with the retention.
--
-- Every row of a task is written between its enqueue and shortly after its finish: its calls
-- are made, and any earlier finish written, in that span. A task's row now carries when it was
-- enqueued (the envelope's `enqueued_at`, when its producer gave one), and the finds are
-- bounded by the span of the batch's tasks, so Postgres prunes the other partitions when the
-- statement runs: one partition for most batches, two at a month's turn.
--
-- The span allows a day on each side for clocks that disagree (producers', workers'). A task
-- without `enqueued_at` (a producer that leaves it out, a row written before this migration)
-- has no lower bound: its batch looks in every partition before its finish, as before. An
-- `enqueued_at` later than the task's finish (a producer's clock far ahead, or a forged
-- field) counts as the finish: the span then starts a day before it.

ALTER TABLE tasks ADD COLUMN enqueued_at timestamptz;

-- The earliest `called_at` or `finished_at` a row of a task enqueued at `enqueued` and
-- finished at `finished` can hold, and the latest (exclusive): the span above, in one place
-- for the triggers and the finisher.
CREATE FUNCTION ledger_span_from(enqueued timestamptz, finished timestamptz)
RETURNS timestamptz LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN enqueued IS NULL THEN '-infinity'::timestamptz
        ELSE least(enqueued, finished) - interval '24 hours' END
$$;
CREATE FUNCTION ledger_span_until(finished timestamptz)
RETURNS timestamptz LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT finished + interval '24 hours'
$$;

-- The task triggers' statements that find calls by task id (20261202000001_rollup_triggers)
-- get the bounds, and run with nested loops off: with the bounds, the planner expects the
-- lookups to find next to nothing and joined them to the statement's tasks by a nested loop,
-- which ran every partition's lookup of all the batch's ids once per task (40 x 40 probes for
-- a batch of 40, 3.3 ms against 0.8 before the bounds, on a ledger of 15 partitions). A hash
-- join runs them once. The functions were made from one text per rollup by that migration; each is
-- rewritten here by replacing its one line that finds the calls, and the migration fails if a
-- function does not hold that line exactly once.
DO $migration$
DECLARE
    f record;
    def text;
    line text;
BEGIN
    FOR f IN
        SELECT * FROM (VALUES ('tasks_inserted', 'n', 'new_rows'), ('tasks_updated', 'n', 'new_rows'),
            ('tasks_deleted', 'o', 'old_rows')) AS v(name, alias, rows)
    LOOP
        def := pg_get_functiondef(f.name::regproc);
        line := format('      AND c.task_id = ANY(ARRAY(SELECT %1$s.task_id FROM %2$s %1$s))',
            f.alias, f.rows);
        IF (length(def) - length(replace(def, line, ''))) / length(line) <> 1 THEN
            RAISE EXCEPTION 'the trigger function % does not find calls as migration 20261202000001 wrote it',
                f.name;
        END IF;
        EXECUTE replace(def, line, line || format('
      AND c.called_at >= (SELECT min(ledger_span_from(%1$s.enqueued_at, %1$s.finished_at)) FROM %2$s %1$s)
      AND c.called_at < (SELECT max(ledger_span_until(%1$s.finished_at)) FROM %2$s %1$s)',
            f.alias, f.rows));
        EXECUTE format('ALTER FUNCTION %I() SET enable_nestloop = off', f.name);
    END LOOP;
END $migration$;

-- The task triggers copy a task's view (status, verdict, risk) to its calls when a task row
-- changes (`tasks_updated`) and take it away when one goes (`tasks_deleted`), with an UPDATE
-- of `provider_calls` joined to the statement's rows (20261204000001). They ran that UPDATE
-- for every statement, also when the statement changed no row: and every write of a worker's
-- batch runs two such statements on `tasks` as a rule, its upsert (which fires the UPDATE
-- triggers though no row conflicts) and its delete of earlier finishes (which finds none).
-- Each ran an UPDATE that could find nothing, yet opened a scan of every partition of
-- `provider_calls` to learn it: about 0.35 ms a statement on a ledger of 16 partitions. Now
-- each runs only when the statement changed a row. The functions are rewritten as
-- 20261203000002 did: the one statement is wrapped, and the migration fails if a function
-- does not hold it exactly once.
DO $migration$
DECLARE
    f record;
    def text;
    at integer;
    upto integer;
BEGIN
    FOR f IN
        SELECT * FROM (VALUES
            ('tasks_updated', 'new_rows', 'UPDATE provider_calls c SET task_status = t.status'),
            ('tasks_deleted', 'old_rows', 'UPDATE provider_calls c SET task_status = NULL')
        ) AS v(name, rows, head)
    LOOP
        def := pg_get_functiondef(f.name::regproc);
        IF (length(def) - length(replace(def, f.head, ''))) / length(f.head) <> 1 THEN
            RAISE EXCEPTION 'the trigger function % does not copy task views as migration 20261204000001 wrote it',
                f.name;
        END IF;
        at := position(f.head IN def);
        -- The statement ends at its first semicolon (none in its text before).
        upto := at + position(';' IN substr(def, at));
        EXECUTE substr(def, 1, at - 1)
            || format('IF EXISTS (SELECT FROM %I) THEN
    ', f.rows)
            || substr(def, at, upto - at)
            || '
    END IF;'
            || substr(def, upto);
    END LOOP;
END $migration$;

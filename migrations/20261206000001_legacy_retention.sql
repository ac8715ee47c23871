-- Retention reaches the first partition's months too (issue 68). Each table's first partition
-- (`*_legacy`, made by 20261127000001_partitions) holds every row before its cutoff: on a
-- ledger upgraded from a release before partitions, the whole history. It was dropped only
-- once its cutoff passed the retention, so `ledger.retention` freed none of that history
-- until its newest month was old enough. Now its rows of the months a monthly partition
-- would have dropped are deleted by that exact range (every month whose end is at or before
-- `before`), straight from the partition, so no rollup trigger fires and the rollups keep
-- their sums as they do for a dropped month. The space freed is reused by no later row (the
-- partition's range is in the past once the retention reaches into it) and returned whole
-- when the partition itself is dropped.
CREATE OR REPLACE FUNCTION ledger_drop_partitions(before timestamptz) RETURNS SETOF text
LANGUAGE plpgsql SET timezone = 'UTC' AS $$
DECLARE
    part text;
    col text;
    upto timestamptz := date_trunc('month', before);
    gone bigint;
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
    FOR part, col IN
        SELECT p.name, CASE p.parent WHEN 'tasks' THEN 'finished_at' ELSE 'called_at' END
        FROM ledger_partitions p
        WHERE p.name = p.parent || '_legacy' AND p.upper > before
        ORDER BY 1
    LOOP
        EXECUTE format('DELETE FROM %I WHERE %I < $1', part, col) USING upto;
        GET DIAGNOSTICS gone = ROW_COUNT;
        IF gone > 0 THEN
            RETURN NEXT format('%s: %s rows before %s', part, gone, to_char(upto, 'YYYY-MM-DD'));
        END IF;
    END LOOP;
END $$;

-- A roll with nothing to sum costs a few milliseconds however long the history (issue 68).
-- `ledger_roll()` finds the rows to sum by `written` between the old line and the new, or
-- written by a transaction pending at the last roll that has finished since (`finished`).
-- That list is empty nearly always, and the planner, given `written = ANY ('{}')`, an arm
-- that can never be true, proved from it the predicate of any partial index (false implies
-- everything) and read that arm from the biggest: on a ledger upgraded from a release before
-- partitions, `provider_calls_chain_id` of the first partition, every chain step's call in
-- the history (431 ms at 1M calls, 2 s at 5M, for every report; a ledger filled since
-- carried statistics that steered it elsewhere). The arm is now left out when the list is
-- empty: `cardinality(finished) > 0` folds to false in the plan of each call, which
-- `plan_cache_mode = force_custom_plan` makes for the values of that call, so the rows are
-- found by the range of `written` alone, from each partition's BRIN index. Rewritten in
-- place as 20261205000001 did: the migration fails if the function does not hold the arm
-- where 20261204000001 put it.
DO $migration$
DECLARE
    def text := pg_get_functiondef('ledger_roll'::regproc);
    arm CONSTANT text := 'OR a.written = ANY (finished)';
    n integer;
BEGIN
    n := (length(def) - length(replace(def, arm, ''))) / length(arm);
    IF n <> 15 THEN
        RAISE EXCEPTION 'ledger_roll() holds % arms of pending transactions, not the 15 migration 20261204000001 wrote', n;
    END IF;
    EXECUTE replace(def, arm, 'OR (cardinality(finished) > 0 AND a.written = ANY (finished))');
END $migration$;

ALTER FUNCTION ledger_roll() SET plan_cache_mode = force_custom_plan;

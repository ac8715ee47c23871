-- A batch's runs that failed (Postgres or Redis failing, its input file gone): each is tried
-- again once its lease lapses, and the batch fails after a few, with the last run's reason.
ALTER TABLE serve_batches
    ADD COLUMN failed_runs integer NOT NULL DEFAULT 0,
    ADD COLUMN last_run_error text;

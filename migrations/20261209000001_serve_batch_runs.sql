-- A batch's runs that failed (Postgres or Redis failing): each is tried again later, and the
-- batch fails after a few, with the last run's reason.
ALTER TABLE serve_batches
    ADD COLUMN failed_runs integer NOT NULL DEFAULT 0,
    ADD COLUMN last_run_error text;

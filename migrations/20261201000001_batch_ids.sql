-- The batch a task came in (the envelope's `batch_id`, `llmq batch`'s id), kept with the task:
-- `llmq costs --batch <id>` and the page read one batch's tasks by it, and their calls by task
-- id. A new column without a default changes no row. Its index (`tasks_batch_id`, batch tasks
-- only) is built after the migrations by `llmq migrate` (`Ledger::migrate`), a partition at a
-- time CONCURRENTLY, so that a populated ledger is not locked for a scan.
ALTER TABLE tasks ADD COLUMN batch_id TEXT;

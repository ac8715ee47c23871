-- The batch a task came in (the envelope's `batch_id`, `llmq batch`'s id), kept with the task:
-- `llmq costs --batch <id>` and the page read one batch's tasks by it, and their calls by task
-- id. A new column without a default changes no row; the index holds only batch tasks.
ALTER TABLE tasks ADD COLUMN batch_id TEXT;
CREATE INDEX tasks_batch_id ON tasks (batch_id) WHERE batch_id IS NOT NULL;

-- Three indexes of the ledger's raw rows that no read uses any more: every row written paid for
-- them (a task three B-tree entries, a call two), and the rollups took over what read them.
--
-- `tasks_type_finished_at` served the `routing_stats` duty's scan of 30 days of tasks by type;
-- the duty reads `routing_rollups` (20261126000002). `tasks_finished_at` and
-- `provider_calls_called_at` served the reports' scans of a time range; the reports read the
-- rollups (20261126000001), and what still reads raw rows finds them by task, chain or batch
-- (`tasks_key`, `provider_calls_key`, `tasks_chain_id`, `provider_calls_chain_id`,
-- `tasks_batch_id`). A read by time alone (`llmq insights replay`, which reads every logged
-- route of its range) is pruned to the range's monthly partitions, and reads them whole either
-- way. Moving rows out of the default partition when a month's partition is made
-- (`ledger_make_partitions`) scans the default partition, which holds only rows written with a
-- clock outside every partition.
--
-- Dropping an index of a partitioned table drops each partition's with it: no scan, a brief
-- exclusive lock.
DROP INDEX IF EXISTS tasks_type_finished_at;
DROP INDEX IF EXISTS tasks_finished_at;
DROP INDEX IF EXISTS provider_calls_called_at;

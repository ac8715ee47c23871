-- One fencing row per scheduler namespace (`llmq-scheduler --namespace`, for deployments or
-- test suites that share one Redis and one database); '' is the default deployment, which
-- keeps the token the single row had.
ALTER TABLE scheduler_lease ADD COLUMN namespace TEXT NOT NULL DEFAULT '';
ALTER TABLE scheduler_lease DROP COLUMN id;
ALTER TABLE scheduler_lease ADD PRIMARY KEY (namespace);

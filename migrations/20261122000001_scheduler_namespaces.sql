-- One fencing row per scheduler namespace (`llmq-scheduler --namespace`, for deployments or
-- test suites that share one Redis and one database). The default namespace '' keeps row 1
-- and its token, so a scheduler of the previous release, which writes `id = 1`, and one of
-- this release, which writes `namespace = ''`, fence each other during a rolling upgrade.
ALTER TABLE scheduler_lease DROP CONSTRAINT scheduler_lease_id_check;
ALTER TABLE scheduler_lease ADD COLUMN namespace TEXT NOT NULL DEFAULT '';
CREATE UNIQUE INDEX scheduler_lease_namespace ON scheduler_lease (namespace);
CREATE SEQUENCE scheduler_lease_id_seq AS SMALLINT START 2 OWNED BY scheduler_lease.id;
ALTER TABLE scheduler_lease ALTER COLUMN id SET DEFAULT nextval('scheduler_lease_id_seq');

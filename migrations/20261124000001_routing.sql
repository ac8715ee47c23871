-- What learned routing reads and records (docs/configuration.md, "Routing strategies"):
-- each finished task's risk and how long it ran; the verdict of a review or check that judged
-- its output (NULL when none did); and, when a learned strategy chose its model, which
-- strategy, the probability it gave that model (its propensity) and whether it explored.
-- Additive: workers of the previous version write their rows as before.
ALTER TABLE tasks
    ADD COLUMN risk        TEXT,
    ADD COLUMN duration_ms BIGINT,
    ADD COLUMN verdict     BOOLEAN,
    ADD COLUMN strategy    TEXT,
    ADD COLUMN propensity  DOUBLE PRECISION,
    ADD COLUMN explored    BOOLEAN;

CREATE INDEX tasks_type_finished_at ON tasks (task_type, finished_at);

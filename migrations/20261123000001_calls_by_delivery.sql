-- Calls are keyed by the delivery that made them, not by (run, attempt, call_no) alone.
--
-- A worker that records its calls and dies before the ack leaves the task to be delivered
-- again with the same run and attempt; that delivery's calls are real calls the provider
-- bills, and under the old key they collided with the first delivery's rows and were
-- dropped. Now each delivery (each time a worker takes the task) has its own id: the same
-- row written twice is one row, and two real calls are two rows.
--
-- A row is written with outcome `started` before its call is made and completed after, so a
-- worker that dies during a call leaves a row for a call the provider may bill.

ALTER TABLE provider_calls ADD COLUMN delivery UUID;
-- Rows written before this migration: one delivery per (task, run, attempt), which is what
-- the old key assumed, so they stay unique.
UPDATE provider_calls SET delivery = md5(task_id::text || '/' || run || '/' || attempt)::uuid;
ALTER TABLE provider_calls ALTER COLUMN delivery SET NOT NULL;
ALTER TABLE provider_calls DROP CONSTRAINT provider_calls_pkey;
ALTER TABLE provider_calls ADD PRIMARY KEY (task_id, delivery, call_no);

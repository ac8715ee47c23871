-- Whose work each task and call was (the envelope's `tenant`) and what it was for (its
-- `tags`, a JSON object of up to 8 name: value pairs), kept with both, so spend can be told
-- apart by tenant and by tag. New columns without a default change no row: on a populated
-- ledger this takes no longer than on an empty one, partitions included. Rows written before
-- it have neither.
ALTER TABLE tasks ADD COLUMN tenant TEXT, ADD COLUMN tags JSONB;
ALTER TABLE provider_calls ADD COLUMN tenant TEXT, ADD COLUMN tags JSONB;

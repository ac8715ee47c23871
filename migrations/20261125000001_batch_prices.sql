-- Calls made through a provider's batch API are billed at the batch price (usually half the
-- list price). `list_cost_usd` is what the same call would have cost at list prices, so
-- `llmq costs` can show what batching saved; it is NULL for every other call.
ALTER TABLE provider_calls ADD COLUMN list_cost_usd NUMERIC(20, 10);

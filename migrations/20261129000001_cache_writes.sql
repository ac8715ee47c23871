-- Prompt tokens a call wrote to the provider's cache (Anthropic's cache_creation_input_tokens),
-- a part of input_tokens priced at the model's cache write price (issue 36). A constant
-- default: no row is rewritten, every partition gains the column at once.
ALTER TABLE provider_calls ADD COLUMN cache_write_tokens BIGINT NOT NULL DEFAULT 0;

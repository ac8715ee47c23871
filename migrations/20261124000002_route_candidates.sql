-- The route a learned strategy chose from: the candidates in order (a JSON array of
-- "provider/model"; the first is the model it chose), for judging another strategy against
-- the same history (`llmq insights replay`). Additive.
ALTER TABLE tasks ADD COLUMN candidates JSONB;

-- The files and batches of `llmq serve`'s OpenAI Files and Batch API and Anthropic's
-- Message Batches (issue 70): kept where every replica of the server reads them and a
-- restart keeps them. A file's bytes are in parts of up to 1 MiB, written and read one at a
-- time, so a 200 MB file never sits whole in a server's memory.
CREATE TABLE serve_files (
    id text PRIMARY KEY,
    -- The tenant of the key that made it (NULL without keys); another tenant cannot see it.
    tenant text,
    purpose text NOT NULL,
    filename text NOT NULL,
    bytes bigint NOT NULL DEFAULT 0,
    -- False while it is being written: a file cut short by a failed upload is not listed.
    complete boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE serve_file_parts (
    file_id text NOT NULL REFERENCES serve_files (id) ON DELETE CASCADE,
    seq integer NOT NULL,
    data bytea NOT NULL,
    PRIMARY KEY (file_id, seq)
);

CREATE TABLE serve_batches (
    id text PRIMARY KEY,
    -- The queue its tasks go to: only a server of that queue drives it, lists or finds it.
    queue text NOT NULL,
    tenant text,
    -- The id of the key that made it, whose models and priority its lines are held to.
    key_id text,
    -- `openai` (the Batch API) or `anthropic` (Message Batches).
    dialect text NOT NULL,
    endpoint text NOT NULL,
    input_file_id text NOT NULL,
    completion_window text NOT NULL,
    metadata jsonb,
    -- validating, in_progress, finalizing, completed, failed, expired, cancelling, cancelled.
    status text NOT NULL,
    -- Why it failed: OpenAI's `errors.data`.
    errors jsonb,
    total integer NOT NULL DEFAULT 0,
    -- Requests that succeeded, failed, were cancelled before they ran, or were unfinished
    -- when the batch expired (while it runs, `completed` counts every finished request).
    completed integer NOT NULL DEFAULT 0,
    failed integer NOT NULL DEFAULT 0,
    cancelled integer NOT NULL DEFAULT 0,
    expired integer NOT NULL DEFAULT 0,
    output_file_id text,
    error_file_id text,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    in_progress_at timestamptz,
    finalizing_at timestamptz,
    completed_at timestamptz,
    failed_at timestamptz,
    cancelling_at timestamptz,
    cancelled_at timestamptz,
    expired_at timestamptz,
    -- The server driving it, until when: another takes it over once that has passed.
    holder text,
    held_until timestamptz
);

CREATE INDEX serve_batches_open ON serve_batches (queue, created_at)
    WHERE status IN ('validating', 'in_progress', 'finalizing', 'cancelling');
CREATE INDEX serve_batches_by_tenant ON serve_batches (queue, tenant, created_at DESC, id DESC);

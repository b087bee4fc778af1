-- Queue: the dead-letter store.
--
-- A stream entry the worker cannot process (no payload, payload not a JSON object, a schema
-- violation, or too many failed deliveries) is acknowledged on its stream and kept here with the
-- reason, so nothing a caller sent is silently dropped. `tokenwarden dead-letters retry <id>`
-- puts the stored fields back on the stream and sets `retried_at`.
--
-- Only the worker (table owner) reads and writes this table: RLS is enabled with no policy,
-- so anon / authenticated / service_role see nothing and cannot write.

CREATE TABLE IF NOT EXISTS public.dead_letters (
    id          bigserial PRIMARY KEY,
    job_type    text        NOT NULL,
    stream      text        NOT NULL,
    entry_id    text        NOT NULL,
    fields      jsonb       NOT NULL,
    reason      text        NOT NULL,
    deliveries  integer     NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    retried_at  timestamptz NULL
);

CREATE INDEX IF NOT EXISTS dead_letters_job_type_created_idx
    ON public.dead_letters (job_type, created_at DESC);
CREATE INDEX IF NOT EXISTS dead_letters_created_idx
    ON public.dead_letters (created_at);
-- One dead letter per stream entry: a crash between the insert and the XACK redelivers the
-- entry, and its second dead-lettering must not store it twice.
CREATE UNIQUE INDEX IF NOT EXISTS dead_letters_stream_entry_key
    ON public.dead_letters (stream, entry_id);

ALTER TABLE public.dead_letters ENABLE ROW LEVEL SECURITY;
REVOKE ALL ON public.dead_letters FROM anon, authenticated, service_role;
REVOKE ALL ON SEQUENCE public.dead_letters_id_seq FROM anon, authenticated, service_role;

-- Ledger bounds live in SQL, in one row that both doors read.
--
-- Before this migration the bounds were checked in Rust (the queue door's payload parser) and
-- in SQL, with different measures, and the SQL door hard-coded the defaults of `[ledger]`
-- (4096 bytes of metadata, 86400 s of hold TTL, a 600 s default TTL): changing `ledger.*` made
-- the two doors disagree. Now:
--   * public.tw_ledger_settings holds every bound the ledger rules enforce. The worker writes
--     the `[ledger]` values into it when it starts (`tokenwarden run`, `tokenwarden migrate`);
--     the character limits of operation_type and reason have no config key and keep the
--     values set here.
--   * tw_ledger_apply_core reads the row once per call and is the only place a bound is
--     checked or the default hold TTL applied (a hold whose ttl_secs is NULL gets it). The
--     queue door only parses the shape of a payload (types, NUL, metadata an object).
--   * tw_ledger_apply keeps its signature; its two bound arguments now default to NULL (= the
--     settings row) and a value given can only tighten a bound for that call.
--   * tw_ledger_same_request is the one statement of the same-fields rule (a repeated request
--     id with other fields is a request_id_conflict), used by tw_ledger_apply_core and by
--     tw_ledger_reject, which records the `rejected` outcome of a queue payload the worker
--     could not parse (formerly an INSERT written in Rust).
-- Functions redefined here run with `search_path = pg_catalog, pg_temp` and name every object
-- with its schema.

-- ---------------------------------------------------------------------------------------------
-- Settings: one row (id = 1). Readable by nobody but the owner: RLS without policies, and no
-- privileges for the API roles (service_role bypasses RLS, so the REVOKE is what keeps it out).
-- ---------------------------------------------------------------------------------------------

CREATE TABLE public.tw_ledger_settings (
    id                       integer PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    -- largest metadata object, measured as octet_length(metadata::text) (ledger.metadata_max_bytes)
    metadata_max_bytes       integer NOT NULL DEFAULT 4096 CHECK (metadata_max_bytes >= 1),
    -- longest hold a caller may ask for, seconds (ledger.max_hold_ttl_secs)
    max_hold_ttl_secs        integer NOT NULL DEFAULT 86400 CHECK (max_hold_ttl_secs >= 1),
    -- lifetime of a hold that gives no ttl_secs, seconds (ledger.default_hold_ttl_secs)
    default_hold_ttl_secs    integer NOT NULL DEFAULT 600,
    -- operation_type of consume and hold: 1 to this many characters
    operation_type_max_chars integer NOT NULL DEFAULT 100 CHECK (operation_type_max_chars >= 1),
    -- reason of grant: 1 to this many characters
    reason_max_chars         integer NOT NULL DEFAULT 200 CHECK (reason_max_chars >= 1),
    updated_at               timestamptz NOT NULL DEFAULT pg_catalog.now(),
    CHECK (default_hold_ttl_secs BETWEEN 1 AND max_hold_ttl_secs)
);
INSERT INTO public.tw_ledger_settings (id) VALUES (1);

ALTER TABLE public.tw_ledger_settings ENABLE ROW LEVEL SECURITY;
REVOKE ALL ON public.tw_ledger_settings FROM PUBLIC, anon, authenticated, service_role;

-- ---------------------------------------------------------------------------------------------
-- tw_ledger_same_request: whether two requests with one request id carry the same fields, i.e.
-- whether a repeat replays the first outcome (true) or is a request_id_conflict (false).
-- Compared: kind, user_id (consume/grant/hold only: a settle/release stores its hold's user),
-- hold_id, amount, label, ttl_secs and metadata, NULLs equal. A SQL-standard body is bound when
-- it is created (no search_path lookups at run time) and is inlined into its callers' queries.
-- ---------------------------------------------------------------------------------------------

CREATE FUNCTION public.tw_ledger_same_request(
    a_kind text, a_user_id uuid, a_hold_id uuid, a_amount bigint, a_label text,
    a_ttl_secs integer, a_metadata jsonb,
    b_kind text, b_user_id uuid, b_hold_id uuid, b_amount bigint, b_label text,
    b_ttl_secs integer, b_metadata jsonb
)
RETURNS boolean
LANGUAGE sql
IMMUTABLE
PARALLEL SAFE
RETURN (a_kind, CASE WHEN a_kind IN ('consume', 'grant', 'hold') THEN a_user_id END,
        a_hold_id, a_amount, a_label, a_ttl_secs, a_metadata)
       IS NOT DISTINCT FROM
       (b_kind, CASE WHEN b_kind IN ('consume', 'grant', 'hold') THEN b_user_id END,
        b_hold_id, b_amount, b_label, b_ttl_secs, b_metadata);

-- tw_ledger_apply_core and tw_ledger_apply_one read these bounds from 20261201095000_ledger_core.sql
-- on (that migration rewrites the core once; this one used to carry an interim copy of it).

-- The entry point of both doors, redefined: same signature and planning as before; the bound
-- arguments default to NULL (= the settings row), so both doors call it without them.
CREATE OR REPLACE FUNCTION public.tw_ledger_apply(
    p_request_ids uuid[],
    p_kinds text[],
    p_user_ids uuid[],
    p_amounts bigint[],
    p_labels text[],
    p_hold_ids uuid[],
    p_ttl_secs integer[],
    p_metadata jsonb[],
    p_metadata_max_bytes integer DEFAULT NULL,
    p_max_ttl_secs integer DEFAULT NULL
)
RETURNS TABLE (request_id uuid, status text, balance bigint, held bigint, reason text)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_custom_plan
AS $fn$
BEGIN
    IF coalesce(pg_catalog.array_length(p_request_ids, 1), 0) <= 8 THEN
        PERFORM pg_catalog.set_config('plan_cache_mode', 'force_generic_plan', true);
    END IF;
    RETURN QUERY
    SELECT * FROM public.tw_ledger_apply_core(p_request_ids, p_kinds, p_user_ids, p_amounts,
                                              p_labels, p_hold_ids, p_ttl_secs, p_metadata,
                                              p_metadata_max_bytes, p_max_ttl_secs);
END
$fn$;


-- hold_tokens, redefined: p_ttl_secs defaults to NULL, which tw_ledger_apply_core replaces with
-- tw_ledger_settings.default_hold_ttl_secs (it was a fixed 600).
CREATE OR REPLACE FUNCTION public.hold_tokens(
    p_request_id uuid, p_user_id uuid, p_amount bigint, p_operation_type text,
    p_ttl_secs integer DEFAULT NULL, p_metadata jsonb DEFAULT '{}'::jsonb
)
RETURNS jsonb
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT public.tw_ledger_apply_one(p_request_id, 'hold', p_user_id, p_amount,
                                      p_operation_type, NULL, p_ttl_secs, p_metadata)
           || pg_catalog.jsonb_build_object('hold_id', p_request_id);
$fn$;

-- ---------------------------------------------------------------------------------------------
-- tw_ledger_reject: the durable `rejected` outcome of a queue payload the worker could not parse
-- (wrong types, unknown fields, NUL) but whose request id it could read, so the queue door
-- answers like the SQL door. The other arguments are what could be read of the payload (NULL
-- where a field was missing or unreadable). If the request id is new, stores the rejection and
-- returns it; otherwise returns, as tw_ledger_apply would, the stored outcome when the fields
-- are the same, else request_id_conflict (not stored). Called by the worker only.
-- ---------------------------------------------------------------------------------------------

CREATE FUNCTION public.tw_ledger_reject(
    p_request_id uuid, p_kind text, p_user_id uuid, p_hold_id uuid, p_amount bigint,
    p_label text, p_ttl_secs integer, p_metadata jsonb, p_reason text
)
RETURNS TABLE (request_id uuid, status text, balance bigint, held bigint, reason text)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
#variable_conflict use_column
DECLARE
    r record;
BEGIN
    INSERT INTO public.ledger_requests
           (request_id, kind, user_id, hold_id, amount, label, ttl_secs, metadata, status,
            reason)
    VALUES (p_request_id, p_kind, p_user_id, p_hold_id, p_amount, p_label, p_ttl_secs,
            p_metadata, 'rejected', p_reason)
    ON CONFLICT (request_id) DO NOTHING;
    IF FOUND THEN
        RETURN QUERY SELECT p_request_id, 'rejected'::text, NULL::bigint, NULL::bigint, p_reason;
        RETURN;
    END IF;
    -- A new statement: it sees the row a concurrent transaction committed after this one began.
    SELECT l.kind, l.user_id, l.hold_id, l.amount, l.label, l.ttl_secs, l.metadata, l.status,
           l.balance_after, l.held_after, l.reason
      INTO STRICT r
      FROM public.ledger_requests l
     WHERE l.request_id = p_request_id;
    IF public.tw_ledger_same_request(r.kind, r.user_id, r.hold_id, r.amount, r.label,
                                     r.ttl_secs, r.metadata,
                                     p_kind, p_user_id, p_hold_id, p_amount, p_label,
                                     p_ttl_secs, p_metadata) THEN
        RETURN QUERY SELECT p_request_id, r.status, r.balance_after, r.held_after, r.reason;
    ELSE
        RETURN QUERY SELECT p_request_id, 'request_id_conflict'::text, NULL::bigint,
                            NULL::bigint, 'request id already used with different fields'::text;
    END IF;
END
$fn$;

-- CREATE OR REPLACE keeps the privileges of the redefined functions. The new ones are for the
-- ledger's own use: the API roles get nothing (Supabase's default privileges would grant them
-- EXECUTE).
REVOKE ALL ON FUNCTION
    public.tw_ledger_same_request(text, uuid, uuid, bigint, text, integer, jsonb,
                                  text, uuid, uuid, bigint, text, integer, jsonb),
    public.tw_ledger_reject(uuid, text, uuid, uuid, bigint, text, integer, jsonb, text)
FROM PUBLIC, anon, authenticated, service_role;

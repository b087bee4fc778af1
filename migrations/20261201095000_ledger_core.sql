-- The ledger core, rewritten once (issue 9 §4, issue 12). Same public signatures, same rules and
-- outcomes as 20261201000100_ledger_settings.sql (whose bounds, from tw_ledger_settings, it
-- keeps); what changes:
--   * One consume or grant (the SQL door, a queue batch of one) takes a fast path in
--     tw_ledger_apply_core: primary-key reads, one locked read and one UPDATE of the account,
--     one statement for the history row and the outcome; the rules themselves (step 4) are the
--     batch's, unchanged. tw_ledger_apply_one calls the core directly (no planning wrapper).
--   * Argument arrays must be one-dimensional and start at index 1 (SQLSTATE 22023): an
--     array '[0:1]={1,1000}' was read by subscript in one place and by unnest in another.
--   * A rejected request is stored bounded: label cut to 200 characters, metadata over 1024
--     bytes replaced by a JSON string of its first 1024 characters, and fields_sha256 (SHA-256
--     of every field) kept, so a repeat with the same fields still replays `rejected` and one
--     with other fields is still a request_id_conflict. Outcomes stored before this migration
--     (fields_sha256 NULL) compare field by field as before.
--   * No account row is left by an operation that did not succeed: the fast path creates a
--     grant's account only when the grant is decided here, and a batch removes the accounts
--     it created for grants that failed.
-- The per-operation checks (tw_ledger_check: validation and metadata normalisation) and the
-- same-fields rule against a stored outcome (tw_ledger_same_stored) are functions, each used by
-- both paths (the latter by tw_ledger_reject too).
-- Every helper here is PL/pgSQL, tw_ledger_same_request too (redefined): the privileges
-- migration pins every function's search_path, and a SQL function with a SET clause is never
-- inlined, so it re-plans its body for each calling statement (15-100 µs a call, measured;
-- once per operation in a batch). A PL/pgSQL function keeps its compiled expression for the
-- session (2-3 µs a call).

ALTER TABLE public.ledger_requests ADD COLUMN fields_sha256 bytea NULL;
COMMENT ON COLUMN public.ledger_requests.fields_sha256 IS
    'Rejected requests only: SHA-256 of the request''s fields (tw_ledger_fields_sha256); label and metadata are stored cut (tw_ledger_kept_label, tw_ledger_kept_metadata).';

-- The per-operation checks, once per call for all operations: `metadata` is p_metadata with
-- NULL and JSON null read as {}; `rejections` says why each operation is rejected (NULL: it is
-- valid). The bounds come from tw_ledger_settings. One query over the arrays, planned once per
-- session, so a batch pays no function call per operation.
CREATE FUNCTION public.tw_ledger_check(
    p_kinds text[], p_user_ids uuid[], p_hold_ids uuid[], p_amounts bigint[], p_labels text[],
    p_ttl_secs integer[], p_metadata jsonb[], p_optype_max integer, p_reason_max integer,
    p_metadata_max integer, p_max_ttl integer,
    OUT metadata jsonb[], OUT rejections text[]
)
LANGUAGE plpgsql
STABLE
PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    SELECT pg_catalog.array_agg(t.m ORDER BY t.ord),
           pg_catalog.array_agg(CASE
               WHEN t.k IS NULL OR t.k NOT IN ('consume', 'grant', 'hold', 'settle', 'release')
                   THEN 'unknown operation kind'
               WHEN t.k IN ('consume', 'grant', 'hold') AND t.u IS NULL
                   THEN 'user_id is required'
               WHEN t.k IN ('settle', 'release') AND t.h IS NULL
                   THEN 'hold_id is required'
               WHEN t.k <> 'release' AND t.a IS NULL
                   THEN 'amount is required'
               WHEN t.k <> 'release' AND t.a <= 0
                   THEN pg_catalog.format('amount must be a positive integer, got %s', t.a)
               WHEN t.k IN ('consume', 'hold')
                    AND (t.l IS NULL OR pg_catalog.char_length(t.l) NOT BETWEEN 1 AND p_optype_max)
                   THEN pg_catalog.format('operation_type must be 1 to %s characters', p_optype_max)
               WHEN t.k = 'grant'
                    AND (t.l IS NULL OR pg_catalog.char_length(t.l) NOT BETWEEN 1 AND p_reason_max)
                   THEN pg_catalog.format('reason must be 1 to %s characters', p_reason_max)
               WHEN pg_catalog.jsonb_typeof(t.m) <> 'object'
                   THEN 'metadata must be a JSON object'
               WHEN pg_catalog.octet_length(t.m::text) > p_metadata_max
                   THEN pg_catalog.format(
                       'metadata is %s bytes, more than the limit of %s bytes',
                       pg_catalog.octet_length(t.m::text), p_metadata_max)
               WHEN t.k = 'hold' AND (t.ttl IS NULL OR t.ttl < 1 OR t.ttl > p_max_ttl)
                   THEN pg_catalog.format('ttl_secs must be between 1 and %s', p_max_ttl)
               END ORDER BY t.ord)
      INTO metadata, rejections
      FROM (SELECT x.ord, x.k, x.u, x.h, x.a, x.l, x.ttl,
                   CASE WHEN x.m IS NULL OR pg_catalog.jsonb_typeof(x.m) = 'null'
                        THEN '{}'::jsonb ELSE x.m END AS m
              FROM unnest(p_kinds, p_user_ids, p_hold_ids, p_amounts, p_labels, p_ttl_secs,
                          p_metadata) WITH ORDINALITY AS x(k, u, h, a, l, ttl, m, ord)) t;
END
$fn$;

-- What a rejected request keeps of its label and metadata: enough to read what was sent, never
-- the whole of an oversized field.
CREATE FUNCTION public.tw_ledger_kept_label(p_label text)
RETURNS text
LANGUAGE plpgsql
IMMUTABLE
PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    RETURN pg_catalog.left(p_label, 200);
END
$fn$;

CREATE FUNCTION public.tw_ledger_kept_metadata(p_metadata jsonb)
RETURNS jsonb
LANGUAGE plpgsql
IMMUTABLE
PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    RETURN CASE WHEN pg_catalog.octet_length(p_metadata::text) <= 1024 THEN p_metadata
                ELSE pg_catalog.to_jsonb(pg_catalog.left(p_metadata::text, 1024)) END;
END
$fn$;

-- SHA-256 of a request's fields, as tw_ledger_same_request compares them (kind, the user of a
-- consume/grant/hold, hold_id, amount, label, ttl_secs, metadata; NULLs distinct from '').
-- Equal fields give equal digests; jsonb prints equal objects identically (keys sorted), except
-- numbers written differently (1 and 1.0), which count as different here.
CREATE FUNCTION public.tw_ledger_fields_sha256(
    p_kind text, p_user_id uuid, p_hold_id uuid, p_amount bigint, p_label text,
    p_ttl_secs integer, p_metadata jsonb
)
RETURNS bytea
LANGUAGE plpgsql
IMMUTABLE
PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    RETURN pg_catalog.sha256(pg_catalog.convert_to(
        pg_catalog.jsonb_build_array(
            p_kind, CASE WHEN p_kind IN ('consume', 'grant', 'hold') THEN p_user_id END,
            p_hold_id, p_amount, p_label, p_ttl_secs, p_metadata)::text,
        'UTF8'));
END
$fn$;

-- tw_ledger_same_request, redefined in PL/pgSQL (see above); same signature and rule.
CREATE OR REPLACE FUNCTION public.tw_ledger_same_request(
    a_kind text, a_user_id uuid, a_hold_id uuid, a_amount bigint, a_label text,
    a_ttl_secs integer, a_metadata jsonb,
    b_kind text, b_user_id uuid, b_hold_id uuid, b_amount bigint, b_label text,
    b_ttl_secs integer, b_metadata jsonb
)
RETURNS boolean
LANGUAGE plpgsql
IMMUTABLE
PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    RETURN (a_kind, CASE WHEN a_kind IN ('consume', 'grant', 'hold') THEN a_user_id END,
            a_hold_id, a_amount, a_label, a_ttl_secs, a_metadata)
           IS NOT DISTINCT FROM
           (b_kind, CASE WHEN b_kind IN ('consume', 'grant', 'hold') THEN b_user_id END,
            b_hold_id, b_amount, b_label, b_ttl_secs, b_metadata);
END
$fn$;

-- Whether a request carries the fields of the stored outcome of its id (true: replay it;
-- false: request_id_conflict). A stored rejection with fields_sha256 kept only a cut copy of
-- its fields: compare digests; otherwise compare the fields (tw_ledger_same_request).
CREATE FUNCTION public.tw_ledger_same_stored(
    r_kind text, r_user_id uuid, r_hold_id uuid, r_amount bigint, r_label text,
    r_ttl_secs integer, r_metadata jsonb, r_fields_sha256 bytea,
    b_kind text, b_user_id uuid, b_hold_id uuid, b_amount bigint, b_label text,
    b_ttl_secs integer, b_metadata jsonb
)
RETURNS boolean
LANGUAGE plpgsql
IMMUTABLE
PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    RETURN CASE
        WHEN r_fields_sha256 IS NOT NULL
            THEN r_fields_sha256 = public.tw_ledger_fields_sha256(
                     b_kind, b_user_id, b_hold_id, b_amount, b_label, b_ttl_secs, b_metadata)
        ELSE public.tw_ledger_same_request(
                 r_kind, r_user_id, r_hold_id, r_amount, r_label, r_ttl_secs, r_metadata,
                 b_kind, b_user_id, b_hold_id, b_amount, b_label, b_ttl_secs, b_metadata)
        END;
END
$fn$;

-- ---------------------------------------------------------------------------------------------
-- tw_ledger_apply_core, rewritten. Shape of the work:
--   * a batch (or one hold/settle/release): steps 1-3 lock every touched account once in
--     user_id order and read holds and stored outcomes with set-based statements, step 4
--     evaluates in memory, step 5 writes one UPDATE per account and bulk inserts;
--   * one consume or grant: steps 1'-3' and 5' do the same by primary key (see there).
-- ---------------------------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION public.tw_ledger_apply_core(
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
-- Every table access here is by key: a sequential scan of accounts (live and dead versions) per
-- batch costs more than the batch's index probes once the table has a few thousand rows.
SET enable_seqscan = off
AS $fn$
#variable_conflict use_column
DECLARE
    n integer := coalesce(pg_catalog.array_length(p_request_ids, 1), 0);
    v_now timestamptz := pg_catalog.now();
    c_max constant bigint := 9223372036854775807;
    -- the bounds, from public.tw_ledger_settings
    v_metadata_max integer;
    v_max_ttl integer;
    v_default_ttl integer;
    v_optype_max integer;
    v_reason_max integer;
    v_has_grant boolean;
    v_has_holds boolean;
    -- per operation, from the preparation query
    op_meta jsonb[];
    op_first integer[];     -- position of the first op with this request id in the batch
    op_ord integer[];       -- positions, to check the aggregate kept the order
    op_reject text[];       -- validation failure, if any
    op_slot integer[];      -- account slot (consume/grant/hold)
    op_hslot integer[];     -- hold slot (hold/settle/release)
    ex_status text[];       -- stored outcome of this request id, if any
    ex_same boolean[];      -- this op's fields equal the stored ones
    ex_balance bigint[];
    ex_held bigint[];
    ex_reason text[];
    -- per operation, decided by the loop
    o_status text[];
    o_balance bigint[];
    o_held bigint[];
    o_reason text[];
    o_user uuid[];          -- settle/release: the hold's user
    o_expired boolean[];    -- settle/release expired the hold now ('expire' history row)
    o_hist_amount bigint[]; -- release/expire: the hold's amount
    o_optype text[];        -- settle/release/expire: the hold's operation_type
    -- accounts (slots, sorted by user id)
    v_users uuid[];
    a_user uuid[];
    a_balance bigint[];
    a_held bigint[];
    a_granted bigint[];
    a_consumed bigint[];
    a_blocked boolean[];
    -- The account row was seen (and locked) by the lock query. A row inserted by a concurrent,
    -- still uncommitted transaction is not: its slot reads as an empty account and the batch
    -- must never write it (see step 5).
    a_found boolean[];
    -- holds (slots, sorted by hold id)
    h_id uuid[];
    h_slot integer[];
    h_amount bigint[];
    h_status text[];
    h_expires timestamptz[];
    h_settled bigint[];
    h_optype text[];
    h_meta jsonb[];
    h_new boolean[];
    h_dirty boolean[];
    -- loop state
    i integer;
    f integer;
    s integer;
    hs integer;
    k text;
    a bigint;
    -- one consume or grant (the fast path, see below)
    v_single boolean;
    v_read record;
    d_balance bigint;
    d_held bigint;
    d_granted bigint;
    d_consumed bigint;
    v_balance bigint;
    v_held bigint;
    -- accounts this call inserted for its grants (removed again if no grant of theirs succeeds)
    v_created uuid[];
BEGIN
    IF n = 0 THEN
        RETURN;
    END IF;
    IF pg_catalog.array_length(p_kinds, 1) IS DISTINCT FROM n
        OR pg_catalog.array_length(p_user_ids, 1) IS DISTINCT FROM n
        OR pg_catalog.array_length(p_amounts, 1) IS DISTINCT FROM n
        OR pg_catalog.array_length(p_labels, 1) IS DISTINCT FROM n
        OR pg_catalog.array_length(p_hold_ids, 1) IS DISTINCT FROM n
        OR pg_catalog.array_length(p_ttl_secs, 1) IS DISTINCT FROM n
        OR pg_catalog.array_length(p_metadata, 1) IS DISTINCT FROM n THEN
        RAISE EXCEPTION 'tw_ledger_apply: all argument arrays must have % elements', n
            USING ERRCODE = '22023';
    END IF;
    -- Elements are read both by subscript (1 .. n) and with unnest: an array that starts at
    -- another index, or has more than one dimension, would make the two disagree (an array
    -- '[0:1]={1,1000}' once charged 1000 and recorded 1). Refused, never reinterpreted.
    IF pg_catalog.array_lower(p_request_ids, 1) <> 1 OR pg_catalog.array_lower(p_kinds, 1) <> 1
        OR pg_catalog.array_lower(p_user_ids, 1) <> 1 OR pg_catalog.array_lower(p_amounts, 1) <> 1
        OR pg_catalog.array_lower(p_labels, 1) <> 1 OR pg_catalog.array_lower(p_hold_ids, 1) <> 1
        OR pg_catalog.array_lower(p_ttl_secs, 1) <> 1
        OR pg_catalog.array_lower(p_metadata, 1) <> 1
        OR pg_catalog.array_ndims(p_request_ids) <> 1 OR pg_catalog.array_ndims(p_kinds) <> 1
        OR pg_catalog.array_ndims(p_user_ids) <> 1 OR pg_catalog.array_ndims(p_amounts) <> 1
        OR pg_catalog.array_ndims(p_labels) <> 1 OR pg_catalog.array_ndims(p_hold_ids) <> 1
        OR pg_catalog.array_ndims(p_ttl_secs) <> 1 OR pg_catalog.array_ndims(p_metadata) <> 1 THEN
        RAISE EXCEPTION 'tw_ledger_apply: argument arrays must be one-dimensional and start at index 1'
            USING ERRCODE = '22023';
    END IF;

    -- 0. The bounds: one row, written by the worker from its [ledger] config. A bound passed
    --    by the caller can only tighten it for this call (LEAST ignores NULL). A hold without
    --    ttl_secs gets the default here, before anything compares or stores its fields.
    SELECT st.metadata_max_bytes, st.max_hold_ttl_secs, st.default_hold_ttl_secs,
           st.operation_type_max_chars, st.reason_max_chars
      INTO v_metadata_max, v_max_ttl, v_default_ttl, v_optype_max, v_reason_max
      FROM public.tw_ledger_settings st
     WHERE st.id = 1;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'tw_ledger_apply: public.tw_ledger_settings has no row'
            USING ERRCODE = '55000';
    END IF;
    v_metadata_max := LEAST(v_metadata_max, p_metadata_max_bytes);
    v_max_ttl := LEAST(v_max_ttl, p_max_ttl_secs);
    IF 'hold' = ANY (p_kinds) THEN
        p_ttl_secs := ARRAY(
            SELECT CASE WHEN x.k = 'hold' THEN coalesce(x.ttl, v_default_ttl) ELSE x.ttl END
              FROM unnest(p_kinds, p_ttl_secs) WITH ORDINALITY AS x(k, ttl, ord)
             ORDER BY x.ord);
    END IF;

    v_has_grant := 'grant' = ANY (p_kinds);
    v_has_holds := 'hold' = ANY (p_kinds) OR 'settle' = ANY (p_kinds)
                   OR 'release' = ANY (p_kinds);

    v_single := n = 1 AND p_kinds[1] IN ('consume', 'grant');
    <<pass>>
    LOOP
        -- 1'-3'. One consume or grant (the SQL door's call, a quiet queue's batch of one), first
        --    pass: settings aside, ONE statement reads the stored outcome of the id, the account
        --    (without locking it) and whether it is blocked; step 4 decides with the batch's rules;
        --    step 5' writes with one guarded UPDATE (see there). The account is written only when
        --    the operation succeeds, so a replay, a conflict or a rejection never creates, locks or
        --    writes one. If the guarded write finds the account changed so that the decision no
        --    longer holds, the operation is decided again by the batch path (second pass), under
        --    the lock. A concurrent first use of the same id fails on the outcome insert
        --    (unique_violation) and the door's retry finds the stored outcome.
        --    Only consume and grant take this path: their success depends on nothing but the
        --    account's totals staying within 0 .. 2^63-1 (and the block, which no path locks).
        IF v_single THEN
            op_ord := ARRAY[1];
            op_first := ARRAY[1];
            SELECT c.metadata, c.rejections INTO op_meta, op_reject
              FROM public.tw_ledger_check(p_kinds, p_user_ids, p_hold_ids, p_amounts, p_labels,
                                          p_ttl_secs, p_metadata, v_optype_max, v_reason_max,
                                          v_metadata_max, v_max_ttl) c;
            op_slot := ARRAY[1];
            op_hslot := ARRAY[NULL::integer];
            SELECT r.status,
                   CASE WHEN r.status IS NOT NULL THEN public.tw_ledger_same_stored(
                       r.kind, r.user_id, r.hold_id, r.amount, r.label, r.ttl_secs, r.metadata,
                       r.fields_sha256, p_kinds[1], p_user_ids[1], p_hold_ids[1], p_amounts[1],
                       p_labels[1], p_ttl_secs[1], op_meta[1]) END AS same,
                   r.balance_after, r.held_after, r.reason,
                   c.user_id IS NOT NULL AS found, coalesce(c.balance, 0) AS balance,
                   coalesce(c.held, 0) AS held, coalesce(c.lifetime_granted, 0) AS granted,
                   coalesce(c.lifetime_consumed, 0) AS consumed,
                   EXISTS (SELECT 1 FROM public.token_anomalies an
                            WHERE an.user_id = p_user_ids[1] AND an.severity = 'block'
                              AND an.resolved_at IS NULL) AS blocked
              INTO v_read
              FROM (SELECT 1) one
              LEFT JOIN public.ledger_requests r ON r.request_id = p_request_ids[1]
              LEFT JOIN public.credit_accounts c ON c.user_id = p_user_ids[1];
            ex_status := ARRAY[v_read.status];
            ex_same := ARRAY[v_read.same];
            ex_balance := ARRAY[v_read.balance_after];
            ex_held := ARRAY[v_read.held_after];
            ex_reason := ARRAY[v_read.reason];
            a_user := ARRAY[p_user_ids[1]];
            a_found := ARRAY[v_read.found];
            a_balance := ARRAY[v_read.balance];
            a_held := ARRAY[v_read.held];
            a_granted := ARRAY[v_read.granted];
            a_consumed := ARRAY[v_read.consumed];
            a_blocked := ARRAY[v_read.blocked];
        ELSE
            -- 1. Accounts: create the ones grants need, then lock every touched account in user_id
            --    order (one statement) and read its state. Settle/release touch the account of their
            --    hold (a hold's user never changes, so it can be read before locking).
            IF v_has_grant THEN
                WITH created AS (
                    INSERT INTO public.credit_accounts (user_id)
                    SELECT DISTINCT x.u
                      FROM unnest(p_kinds, p_user_ids, p_amounts) AS x(k, u, a)
                     WHERE x.k = 'grant' AND x.u IS NOT NULL AND x.a > 0
                     ORDER BY x.u
                    ON CONFLICT (user_id) DO NOTHING
                    RETURNING credit_accounts.user_id
                )
                SELECT pg_catalog.array_agg(c.user_id) INTO v_created FROM created c;
            END IF;

            IF v_has_holds THEN
                SELECT pg_catalog.array_agg(DISTINCT z.u ORDER BY z.u)
                  INTO v_users
                  FROM (
                    SELECT x.u FROM unnest(p_kinds, p_user_ids) AS x(k, u)
                     WHERE x.k IN ('consume', 'grant', 'hold') AND x.u IS NOT NULL
                    UNION ALL
                    SELECT l.user_id FROM public.token_consumption_locks l
                     WHERE l.hold_id = ANY (p_hold_ids)
                  ) z;
            ELSE
                SELECT pg_catalog.array_agg(DISTINCT x.u ORDER BY x.u)
                  INTO v_users
                  FROM unnest(p_kinds, p_user_ids) AS x(k, u)
                 WHERE x.k IN ('consume', 'grant', 'hold') AND x.u IS NOT NULL;
            END IF;
            v_users := coalesce(v_users, '{}'::uuid[]);

            SELECT pg_catalog.array_agg(q.uid), pg_catalog.array_agg(q.balance),
                   pg_catalog.array_agg(q.held), pg_catalog.array_agg(q.lifetime_granted),
                   pg_catalog.array_agg(q.lifetime_consumed), pg_catalog.array_agg(q.blocked),
                   pg_catalog.array_agg(q.found)
              INTO a_user, a_balance, a_held, a_granted, a_consumed, a_blocked, a_found
              FROM (
                SELECT u.uid, c.user_id IS NOT NULL AS found, coalesce(c.balance, 0) AS balance, coalesce(c.held, 0) AS held,
                       coalesce(c.lifetime_granted, 0) AS lifetime_granted,
                       coalesce(c.lifetime_consumed, 0) AS lifetime_consumed,
                       EXISTS (SELECT 1 FROM public.token_anomalies an
                                WHERE an.user_id = u.uid AND an.severity = 'block'
                                  AND an.resolved_at IS NULL) AS blocked
                  FROM unnest(v_users) WITH ORDINALITY AS u(uid, slot)
                  LEFT JOIN (SELECT c.user_id, c.balance, c.held, c.lifetime_granted,
                                    c.lifetime_consumed
                               FROM public.credit_accounts c
                              WHERE c.user_id = ANY (v_users)
                              ORDER BY c.user_id
                                FOR UPDATE) c ON c.user_id = u.uid
                 ORDER BY u.slot
              ) q;
            IF coalesce(a_user, '{}'::uuid[]) <> v_users THEN
                RAISE EXCEPTION 'tw_ledger_apply: accounts prepared out of order';
            END IF;

            -- 2. Holds referenced by the batch (settle/release targets and holds created here), read
            --    under the account locks.
            IF v_has_holds THEN
                SELECT pg_catalog.array_agg(hx.hid ORDER BY hx.hid),
                       pg_catalog.array_agg(au.slot::integer ORDER BY hx.hid),
                       pg_catalog.array_agg(l.amount ORDER BY hx.hid),
                       pg_catalog.array_agg(l.status ORDER BY hx.hid),
                       pg_catalog.array_agg(l.expires_at ORDER BY hx.hid),
                       pg_catalog.array_agg(l.settled_amount ORDER BY hx.hid),
                       pg_catalog.array_agg(l.operation_type ORDER BY hx.hid),
                       pg_catalog.array_agg(l.metadata ORDER BY hx.hid),
                       pg_catalog.array_agg(false ORDER BY hx.hid),
                       pg_catalog.array_agg(false ORDER BY hx.hid)
                  INTO h_id, h_slot, h_amount, h_status, h_expires, h_settled, h_optype, h_meta,
                       h_new, h_dirty
                  FROM (SELECT DISTINCT CASE WHEN x.k IN ('settle', 'release') THEN x.h
                                             WHEN x.k = 'hold' THEN x.rid END AS hid
                          FROM unnest(p_kinds, p_hold_ids, p_request_ids) AS x(k, h, rid)) hx
                  LEFT JOIN LATERAL (
                    SELECT l.user_id, l.amount, l.status, l.expires_at, l.settled_amount,
                           l.operation_type, l.metadata
                      FROM public.token_consumption_locks l
                     WHERE l.hold_id = hx.hid
                     LIMIT 1) l ON true
                  LEFT JOIN unnest(a_user) WITH ORDINALITY AS au(uid, slot) ON au.uid = l.user_id
                 WHERE hx.hid IS NOT NULL;
            END IF;

            -- 3. Per operation: validation, first occurrence of its id in the batch, stored outcome
            --    (read after the locks, so a concurrent batch's commit on these accounts is visible),
            --    slots. The aggregates read a subquery sorted by position (one sort instead of one per
            --    aggregate); the loop checks the positions came back in order.
            SELECT c.metadata, c.rejections INTO op_meta, op_reject
              FROM public.tw_ledger_check(p_kinds, p_user_ids, p_hold_ids, p_amounts, p_labels,
                                          p_ttl_secs, p_metadata, v_optype_max, v_reason_max,
                                          v_metadata_max, v_max_ttl) c;
            SELECT pg_catalog.array_agg(q.ord), pg_catalog.array_agg(q.first_ord),
                   pg_catalog.array_agg(q.aslot), pg_catalog.array_agg(q.hslot),
                   pg_catalog.array_agg(q.status), pg_catalog.array_agg(q.same),
                   pg_catalog.array_agg(q.balance_after), pg_catalog.array_agg(q.held_after),
                   pg_catalog.array_agg(q.reason)
              INTO op_ord, op_first, op_slot, op_hslot, ex_status, ex_same,
                   ex_balance, ex_held, ex_reason
              FROM (
                SELECT t.ord::integer AS ord, t.first_ord::integer AS first_ord,
                       au.slot::integer AS aslot,
                       hx.slot::integer AS hslot,
                       r.status,
                       CASE WHEN r.status IS NOT NULL THEN public.tw_ledger_same_stored(
                           r.kind, r.user_id, r.hold_id, r.amount, r.label, r.ttl_secs, r.metadata,
                           r.fields_sha256, t.k, t.u, t.h, t.a, t.l, t.ttl, t.m) END AS same,
                       r.balance_after, r.held_after, r.reason
                  FROM (
                    SELECT y.*, pg_catalog.min(y.ord) OVER (PARTITION BY y.rid) AS first_ord
                      FROM (
                        SELECT x.ord, x.rid, x.k, x.u, x.h, x.a, x.l, x.ttl, x.m
                          FROM unnest(p_request_ids, p_kinds, p_user_ids, p_hold_ids, p_amounts,
                                      p_labels, p_ttl_secs, op_meta)
                               WITH ORDINALITY AS x(rid, k, u, h, a, l, ttl, m, ord)
                      ) y
                  ) t
                  LEFT JOIN unnest(a_user) WITH ORDINALITY AS au(uid, slot)
                         ON t.k IN ('consume', 'grant', 'hold') AND au.uid = t.u
                  LEFT JOIN unnest(h_id) WITH ORDINALITY AS hx(hid, slot)
                         ON hx.hid = CASE WHEN t.k = 'hold' THEN t.rid ELSE t.h END
                  -- LATERAL + LIMIT keeps this a primary-key probe per op (never a scan of the table).
                  LEFT JOIN LATERAL (
                    SELECT r.kind, r.user_id, r.hold_id, r.amount, r.label, r.ttl_secs, r.metadata,
                           r.fields_sha256, r.status, r.balance_after, r.held_after, r.reason
                      FROM public.ledger_requests r
                     WHERE r.request_id = t.rid
                     LIMIT 1) r ON true
                 ORDER BY t.ord
              ) q;
        END IF;

        o_status := pg_catalog.array_fill(NULL::text, ARRAY[n]);
        o_balance := pg_catalog.array_fill(NULL::bigint, ARRAY[n]);
        o_held := pg_catalog.array_fill(NULL::bigint, ARRAY[n]);
        o_reason := pg_catalog.array_fill(NULL::text, ARRAY[n]);
        o_user := pg_catalog.array_fill(NULL::uuid, ARRAY[n]);
        o_expired := pg_catalog.array_fill(NULL::boolean, ARRAY[n]);
        o_hist_amount := pg_catalog.array_fill(NULL::bigint, ARRAY[n]);
        o_optype := pg_catalog.array_fill(NULL::text, ARRAY[n]);

        -- 4. Evaluate in arrival order, in memory.
        FOR i IN 1 .. n LOOP
            IF op_ord[i] <> i THEN
                RAISE EXCEPTION 'tw_ledger_apply: operation % prepared out of order', i;
            END IF;
            IF ex_status[i] IS NOT NULL THEN
                -- Seen in an earlier batch: its stored outcome, or a conflict.
                IF ex_same[i] THEN
                    o_status[i] := ex_status[i];
                    o_balance[i] := ex_balance[i];
                    o_held[i] := ex_held[i];
                    o_reason[i] := ex_reason[i];
                ELSE
                    o_status[i] := 'request_id_conflict';
                    o_reason[i] := 'request id already used with different fields';
                END IF;
                CONTINUE;
            END IF;
            IF p_request_ids[i] IS NULL THEN
                o_status[i] := 'rejected';
                o_reason[i] := 'request_id is required';
                CONTINUE;
            END IF;
            f := op_first[i];
            IF f <> i THEN
                -- Seen earlier in this batch: the same fields give the same outcome.
                IF public.tw_ledger_same_request(
                       p_kinds[i], p_user_ids[i], p_hold_ids[i], p_amounts[i], p_labels[i],
                       p_ttl_secs[i], op_meta[i],
                       p_kinds[f], p_user_ids[f], p_hold_ids[f], p_amounts[f], p_labels[f],
                       p_ttl_secs[f], op_meta[f]) THEN
                    o_status[i] := o_status[f];
                    o_balance[i] := o_balance[f];
                    o_held[i] := o_held[f];
                    o_reason[i] := o_reason[f];
                ELSE
                    o_status[i] := 'request_id_conflict';
                    o_reason[i] := 'request id already used with different fields';
                END IF;
                CONTINUE;
            END IF;
            IF op_reject[i] IS NOT NULL THEN
                o_status[i] := 'rejected';
                o_reason[i] := op_reject[i];
                CONTINUE;
            END IF;

            k := p_kinds[i];
            a := p_amounts[i];

            IF k = 'consume' THEN
                s := op_slot[i];
                IF a_blocked[s] THEN
                    o_status[i] := 'rate_limited';
                    o_reason[i] := 'the account has an open blocking usage anomaly';
                ELSIF a_balance[s] < a THEN
                    o_status[i] := 'insufficient_tokens';
                    o_reason[i] := pg_catalog.format('balance %s is less than %s', a_balance[s], a);
                ELSE
                    a_balance[s] := a_balance[s] - a;
                    a_consumed[s] := a_consumed[s] + a;
                    o_status[i] := 'consumed';
                END IF;
                o_balance[i] := a_balance[s];
                o_held[i] := a_held[s];

            ELSIF k = 'grant' THEN
                s := op_slot[i];
                IF NOT a_found[s] AND NOT v_single THEN
                    -- Step 1 inserted (or waited for a concurrent insert of) this account
                    -- before the lock query, so it must have been seen; if not, retry the
                    -- whole batch rather than lose the grant. (Step 5' inserts a new account
                    -- for a single grant.)
                    RAISE EXCEPTION 'tw_ledger_apply: account % of a grant was not locked', a_user[s]
                        USING ERRCODE = '40001';
                END IF;
                IF a > c_max - a_balance[s] OR a > c_max - a_granted[s] THEN
                    o_status[i] := 'rejected';
                    o_reason[i] := 'the grant would overflow the account''s 64-bit totals';
                ELSE
                    a_balance[s] := a_balance[s] + a;
                    a_granted[s] := a_granted[s] + a;
                    o_status[i] := 'granted';
                END IF;
                o_balance[i] := a_balance[s];
                o_held[i] := a_held[s];

            ELSIF k = 'hold' THEN
                s := op_slot[i];
                hs := op_hslot[i];
                IF a_blocked[s] THEN
                    o_status[i] := 'rate_limited';
                    o_reason[i] := 'the account has an open blocking usage anomaly';
                ELSIF a_balance[s] < a THEN
                    o_status[i] := 'insufficient_tokens';
                    o_reason[i] := pg_catalog.format('balance %s is less than %s', a_balance[s], a);
                ELSIF h_status[hs] IS NOT NULL THEN
                    -- Unreachable while holds and outcomes are written together; kept as a guard.
                    o_status[i] := 'rejected';
                    o_reason[i] := 'a hold with this id already exists';
                ELSE
                    a_balance[s] := a_balance[s] - a;
                    a_held[s] := a_held[s] + a;
                    h_slot[hs] := s;
                    h_amount[hs] := a;
                    h_status[hs] := 'held';
                    h_expires[hs] := v_now + pg_catalog.make_interval(secs => p_ttl_secs[i]);
                    h_optype[hs] := p_labels[i];
                    h_meta[hs] := op_meta[i];
                    h_new[hs] := true;
                    o_status[i] := 'held';
                END IF;
                o_balance[i] := a_balance[s];
                o_held[i] := a_held[s];

            ELSE -- settle / release
                hs := op_hslot[i];
                IF h_status[hs] IS NOT NULL AND h_slot[hs] IS NULL THEN
                    -- The hold was committed by a concurrent batch after this one chose which
                    -- accounts to lock: retry the whole batch.
                    RAISE EXCEPTION 'tw_ledger_apply: hold % appeared concurrently', h_id[hs]
                        USING ERRCODE = '40001';
                END IF;
                IF h_status[hs] IS NULL THEN
                    o_status[i] := 'hold_not_found';
                    o_reason[i] := 'no hold with this hold_id';
                    CONTINUE;
                END IF;
                s := h_slot[hs];
                o_user[i] := a_user[s];
                o_optype[i] := h_optype[hs];
                IF h_status[hs] = 'expired' THEN
                    o_status[i] := 'hold_expired';
                    o_reason[i] := 'the hold expired and its tokens were returned';
                ELSIF h_status[hs] <> 'held' THEN
                    o_status[i] := 'hold_already_resolved';
                    o_reason[i] := pg_catalog.format('the hold is already %s', h_status[hs]);
                ELSIF h_expires[hs] <= v_now THEN
                    -- Past due but not yet swept: expire it now (tokens return), then refuse.
                    a_balance[s] := a_balance[s] + h_amount[hs];
                    a_held[s] := a_held[s] - h_amount[hs];
                    h_status[hs] := 'expired';
                    h_dirty[hs] := true;
                    o_expired[i] := true;
                    o_hist_amount[i] := h_amount[hs];
                    o_status[i] := 'hold_expired';
                    o_reason[i] := 'the hold expired and its tokens were returned';
                ELSIF k = 'settle' AND a > h_amount[hs] THEN
                    o_status[i] := 'rejected';
                    o_reason[i] := pg_catalog.format('settle amount %s is more than the %s held',
                                                     a, h_amount[hs]);
                ELSIF k = 'settle' THEN
                    a_held[s] := a_held[s] - h_amount[hs];
                    a_balance[s] := a_balance[s] + (h_amount[hs] - a);
                    a_consumed[s] := a_consumed[s] + a;
                    h_status[hs] := 'settled';
                    h_settled[hs] := a;
                    h_dirty[hs] := true;
                    o_status[i] := 'settled';
                ELSE
                    a_held[s] := a_held[s] - h_amount[hs];
                    a_balance[s] := a_balance[s] + h_amount[hs];
                    h_status[hs] := 'released';
                    h_dirty[hs] := true;
                    o_hist_amount[i] := h_amount[hs];
                    o_status[i] := 'released';
                END IF;
                o_balance[i] := a_balance[s];
                o_held[i] := a_held[s];
            END IF;
        END LOOP;

        -- 5'. One consume or grant: the account is written in ONE statement that locks it and
        --    applies the decided change as a difference, guarded by the bounds the decision relied
        --    on (every total stays within 0 .. 2^63-1), so a concurrent change of the account in
        --    between still gives the right result and the totals it reports; a grant to a new
        --    account inserts it. Then one statement writes the history row and the outcome.
        IF v_single THEN
            -- Decided here (not a replay of a stored outcome) and a success.
            IF ex_status[1] IS NULL AND o_status[1] IN ('consumed', 'granted') THEN
                d_balance := a_balance[1] - v_read.balance;
                d_held := a_held[1] - v_read.held;
                d_granted := a_granted[1] - v_read.granted;
                d_consumed := a_consumed[1] - v_read.consumed;
                IF a_found[1] THEN
                    UPDATE public.credit_accounts c
                       SET balance = c.balance + d_balance, held = c.held + d_held,
                           lifetime_granted = c.lifetime_granted + d_granted,
                           lifetime_consumed = c.lifetime_consumed + d_consumed,
                           updated_at = v_now
                     WHERE c.user_id = a_user[1]
                       AND c.balance >= -LEAST(d_balance, 0)
                       AND c.balance <= c_max - GREATEST(d_balance, 0)
                       AND c.held >= -LEAST(d_held, 0)
                       AND c.held <= c_max - GREATEST(d_held, 0)
                       AND c.lifetime_granted <= c_max - GREATEST(d_granted, 0)
                       AND c.lifetime_consumed <= c_max - GREATEST(d_consumed, 0)
                    RETURNING c.balance, c.held INTO v_balance, v_held;
                ELSE
                    INSERT INTO public.credit_accounts
                           (user_id, balance, held, lifetime_granted, lifetime_consumed, updated_at)
                    VALUES (a_user[1], a_balance[1], a_held[1], a_granted[1], a_consumed[1], v_now)
                    ON CONFLICT (user_id) DO NOTHING
                    RETURNING credit_accounts.balance, credit_accounts.held INTO v_balance, v_held;
                END IF;
                IF NOT FOUND THEN
                    v_single := false;
                    CONTINUE pass;
                END IF;
                o_balance[1] := v_balance;
                o_held[1] := v_held;
            END IF;
            IF ex_status[1] IS NULL AND p_request_ids[1] IS NOT NULL THEN
                k := CASE o_status[1] WHEN 'consumed' THEN 'consume' WHEN 'granted' THEN 'grant' END;
                WITH history AS (
                    INSERT INTO public.token_balance_history
                           (user_id, request_id, hold_id, kind, amount, balance_after, held_after,
                            operation_type, metadata, created_at)
                    SELECT p_user_ids[1], p_request_ids[1], NULL, k, p_amounts[1], o_balance[1],
                           o_held[1], p_labels[1], op_meta[1], v_now
                     WHERE k IS NOT NULL
                )
                INSERT INTO public.ledger_requests
                       (request_id, kind, user_id, hold_id, amount, label, ttl_secs, metadata,
                        fields_sha256, status, balance_after, held_after, reason, created_at)
                VALUES (p_request_ids[1], p_kinds[1], p_user_ids[1], p_hold_ids[1], p_amounts[1],
                        CASE WHEN o_status[1] = 'rejected'
                             THEN public.tw_ledger_kept_label(p_labels[1]) ELSE p_labels[1] END,
                        p_ttl_secs[1],
                        CASE WHEN o_status[1] = 'rejected'
                             THEN public.tw_ledger_kept_metadata(op_meta[1]) ELSE op_meta[1] END,
                        CASE WHEN o_status[1] = 'rejected'
                             THEN public.tw_ledger_fields_sha256(
                                 p_kinds[1], p_user_ids[1], p_hold_ids[1], p_amounts[1],
                                 p_labels[1], p_ttl_secs[1], op_meta[1]) END,
                        o_status[1], o_balance[1], o_held[1], o_reason[1], v_now);
            END IF;
            RETURN QUERY SELECT p_request_ids[1], o_status[1], o_balance[1], o_held[1], o_reason[1];
            RETURN;
        ELSE
            -- 5. Write: one UPDATE per changed account, bulk inserts for the rest.
            --    Only accounts the lock query found (and so locked): an account it did not see may have
            --    been inserted by a concurrent transaction (a grant) that commits before this UPDATE
            --    takes its snapshot; writing our empty-account view over it would lose that grant. An
            --    account not found is never changed by the batch: a grant's account is inserted before
            --    the lock query (checked in the loop), a consume or hold needs a balance > 0, and a
            --    settle/release needs a committed hold, whose account was committed with it.
            UPDATE public.credit_accounts c
               SET balance = x.b, held = x.h, lifetime_granted = x.g, lifetime_consumed = x.c,
                   updated_at = v_now
              FROM unnest(a_user, a_balance, a_held, a_granted, a_consumed, a_found)
                   AS x(u, b, h, g, c, f)
             WHERE c.user_id = ANY (a_user)  -- lets the planner fetch only these rows
               AND c.user_id = x.u
               AND x.f
               AND (c.balance, c.held, c.lifetime_granted, c.lifetime_consumed)
                   IS DISTINCT FROM (x.b, x.h, x.g, x.c);

            IF v_has_holds THEN
                INSERT INTO public.token_consumption_locks
                       (hold_id, user_id, amount, operation_type, status, settled_amount, metadata,
                        expires_at, created_at, resolved_at)
                SELECT x.id, a_user[x.slot], x.amount, x.optype, x.st, x.settled, x.meta, x.expires,
                       v_now, CASE WHEN x.st <> 'held' THEN v_now END
                  FROM unnest(h_id, h_slot, h_amount, h_optype, h_status, h_settled, h_meta, h_expires,
                              h_new)
                       AS x(id, slot, amount, optype, st, settled, meta, expires, isnew)
                 WHERE x.isnew;

                UPDATE public.token_consumption_locks l
                   SET status = x.st, settled_amount = x.settled, resolved_at = v_now
                  FROM unnest(h_id, h_status, h_settled, h_dirty, h_new) AS x(id, st, settled, d, isnew)
                 WHERE x.d AND NOT x.isnew AND l.hold_id = x.id;
            END IF;

            -- Outcomes of the ops decided here (first sight of the id: not a replay, not a conflict)
            -- and their history rows (one per op that changed a balance, in arrival order), from one
            -- pass over the arrays.
            WITH decided AS MATERIALIZED (
                SELECT x.ord, x.rid, x.k, x.h, x.a, x.l, x.ttl, x.m, x.st, x.b, x.hd, x.r,
                       CASE WHEN x.k IN ('consume', 'grant', 'hold') THEN x.u ELSE x.ou END AS usr,
                       CASE x.st WHEN 'consumed' THEN 'consume' WHEN 'granted' THEN 'grant'
                                 WHEN 'held' THEN 'hold' WHEN 'settled' THEN 'settle'
                                 WHEN 'released' THEN 'release'
                                 WHEN 'hold_expired' THEN CASE WHEN x.expired THEN 'expire' END
                            END AS hk,
                       coalesce(x.hamt, x.a) AS hamt, coalesce(x.oop, x.l) AS hop
                  FROM unnest(p_request_ids, p_kinds, p_user_ids, p_hold_ids, p_amounts, p_labels,
                              p_ttl_secs, op_meta, o_status, o_balance, o_held, o_reason, o_user,
                              o_expired, o_hist_amount, o_optype, ex_status, op_first)
                       WITH ORDINALITY
                       AS x(rid, k, u, h, a, l, ttl, m, st, b, hd, r, ou, expired, hamt, oop, exst,
                            first, ord)
                 WHERE x.rid IS NOT NULL AND x.exst IS NULL AND x.first = x.ord
                   AND x.k IN ('consume', 'grant', 'hold', 'settle', 'release')
            ), history AS (
                INSERT INTO public.token_balance_history
                       (user_id, request_id, hold_id, kind, amount, balance_after, held_after,
                        operation_type, metadata, created_at)
                SELECT d.usr, d.rid,
                       CASE WHEN d.k = 'hold' THEN d.rid WHEN d.k IN ('settle', 'release') THEN d.h END,
                       d.hk, d.hamt,
                       d.b, d.hd, d.hop, d.m, v_now
                  FROM decided d
                 WHERE d.hk IS NOT NULL
                 ORDER BY d.ord
            )
            INSERT INTO public.ledger_requests
                   (request_id, kind, user_id, hold_id, amount, label, ttl_secs, metadata,
                    fields_sha256, status, balance_after, held_after, reason, created_at)
            SELECT d.rid, d.k, d.usr, d.h, d.a,
                   CASE WHEN d.st = 'rejected' THEN public.tw_ledger_kept_label(d.l) ELSE d.l END,
                   d.ttl,
                   CASE WHEN d.st = 'rejected' THEN public.tw_ledger_kept_metadata(d.m) ELSE d.m END,
                   CASE WHEN d.st = 'rejected'
                        THEN public.tw_ledger_fields_sha256(d.k, d.usr, d.h, d.a, d.l, d.ttl, d.m) END,
                   d.st, d.b, d.hd, d.r, v_now
              FROM decided d;

            -- An account inserted above for a grant that did not succeed (rejected, a replay, a
            -- conflict, an overflow) is removed again: no operation that failed leaves an account.
            -- Nobody else can have seen or changed it (the insert is not committed), and it still has
            -- no grant exactly when its lifetime_granted is 0.
            IF v_created IS NOT NULL THEN
                DELETE FROM public.credit_accounts c
                 USING unnest(a_user, a_granted) AS x(u, g)
                 WHERE c.user_id = ANY (v_created) AND c.user_id = x.u AND x.g = 0;
            END IF;

            RETURN QUERY
            SELECT x.rid, x.st, x.b, x.h, x.r
              FROM unnest(p_request_ids, o_status, o_balance, o_held, o_reason)
                   WITH ORDINALITY AS x(rid, st, b, h, r, ord)
             ORDER BY x.ord;
            RETURN;
        END IF;
    END LOOP;
END
$fn$;

-- The SQL door's single-operation call, redefined: it calls tw_ledger_apply_core directly
-- (tw_ledger_apply only chooses a plan-cache mode for batches; one operation's statements are
-- all primary-key lookups, well served by the default). Same retry as before: a concurrent first
-- use of the same request id makes the outcome insert collide (unique_violation), and the next
-- attempt finds the stored outcome.
CREATE OR REPLACE FUNCTION public.tw_ledger_apply_one(
    p_request_id uuid, p_kind text, p_user_id uuid, p_amount bigint, p_label text,
    p_hold_id uuid, p_ttl_secs integer, p_metadata jsonb
)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    r record;
    attempt integer;
BEGIN
    FOR attempt IN 1 .. 3 LOOP
        BEGIN
            SELECT * INTO r
              FROM public.tw_ledger_apply_core(
                  ARRAY[p_request_id], ARRAY[p_kind], ARRAY[p_user_id], ARRAY[p_amount],
                  ARRAY[p_label], ARRAY[p_hold_id], ARRAY[p_ttl_secs], ARRAY[p_metadata]);
            RETURN pg_catalog.jsonb_build_object(
                'success', r.status IN ('consumed', 'granted', 'held', 'settled', 'released'),
                'status', r.status,
                'request_id', r.request_id,
                'balance', r.balance,
                'held', r.held,
                'error', CASE WHEN r.status IN ('consumed', 'granted', 'held', 'settled',
                                                'released') THEN NULL ELSE r.status END,
                'reason', r.reason);
        EXCEPTION WHEN unique_violation OR serialization_failure THEN
            IF attempt = 3 THEN
                RAISE;
            END IF;
        END;
    END LOOP;
    RETURN NULL;
END
$fn$;

-- tw_ledger_reject, redefined: the rejection is stored bounded like the core's (label and
-- metadata cut, fields_sha256 kept, the reason cut to 1000 characters), and a repeat is
-- compared with tw_ledger_same_stored.
CREATE OR REPLACE FUNCTION public.tw_ledger_reject(
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
    v_reason text := pg_catalog.left(p_reason, 1000);
BEGIN
    INSERT INTO public.ledger_requests
           (request_id, kind, user_id, hold_id, amount, label, ttl_secs, metadata,
            fields_sha256, status, reason)
    VALUES (p_request_id, p_kind, p_user_id, p_hold_id, p_amount,
            public.tw_ledger_kept_label(p_label), p_ttl_secs,
            public.tw_ledger_kept_metadata(p_metadata),
            public.tw_ledger_fields_sha256(p_kind, p_user_id, p_hold_id, p_amount, p_label,
                                           p_ttl_secs, p_metadata),
            'rejected', v_reason)
    ON CONFLICT (request_id) DO NOTHING;
    IF FOUND THEN
        RETURN QUERY SELECT p_request_id, 'rejected'::text, NULL::bigint, NULL::bigint, v_reason;
        RETURN;
    END IF;
    -- A new statement: it sees the row a concurrent transaction committed after this one began.
    SELECT l.kind, l.user_id, l.hold_id, l.amount, l.label, l.ttl_secs, l.metadata,
           l.fields_sha256, l.status, l.balance_after, l.held_after, l.reason
      INTO STRICT r
      FROM public.ledger_requests l
     WHERE l.request_id = p_request_id;
    IF public.tw_ledger_same_stored(r.kind, r.user_id, r.hold_id, r.amount, r.label,
                                    r.ttl_secs, r.metadata, r.fields_sha256,
                                    p_kind, p_user_id, p_hold_id, p_amount, p_label,
                                    p_ttl_secs, p_metadata) THEN
        RETURN QUERY SELECT p_request_id, r.status, r.balance_after, r.held_after, r.reason;
    ELSE
        RETURN QUERY SELECT p_request_id, 'request_id_conflict'::text, NULL::bigint,
                            NULL::bigint, 'request id already used with different fields'::text;
    END IF;
END
$fn$;

-- The SQL door's entry points, redefined in PL/pgSQL with the same signatures, defaults and
-- results: as SQL functions with a pinned search_path they were planned again on every call
-- (~45 µs of a consume, measured).
CREATE OR REPLACE FUNCTION public.consume_tokens_atomic(
    p_request_id uuid, p_user_id uuid, p_token_amount bigint, p_operation_type text,
    p_metadata jsonb DEFAULT '{}'::jsonb
)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    RETURN public.tw_ledger_apply_one(p_request_id, 'consume', p_user_id, p_token_amount,
                                      p_operation_type, NULL, NULL, p_metadata);
END
$fn$;

CREATE OR REPLACE FUNCTION public.add_tokens(
    p_user_id uuid, p_amount bigint, p_reason text, p_metadata jsonb DEFAULT '{}'::jsonb,
    p_request_id uuid DEFAULT NULL
)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    RETURN public.tw_ledger_apply_one(coalesce(p_request_id, pg_catalog.gen_random_uuid()),
                                      'grant', p_user_id, p_amount, p_reason, NULL, NULL,
                                      p_metadata);
END
$fn$;

CREATE OR REPLACE FUNCTION public.hold_tokens(
    p_request_id uuid, p_user_id uuid, p_amount bigint, p_operation_type text,
    p_ttl_secs integer DEFAULT NULL, p_metadata jsonb DEFAULT '{}'::jsonb
)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    RETURN public.tw_ledger_apply_one(p_request_id, 'hold', p_user_id, p_amount,
                                      p_operation_type, NULL, p_ttl_secs, p_metadata)
           || pg_catalog.jsonb_build_object('hold_id', p_request_id);
END
$fn$;

CREATE OR REPLACE FUNCTION public.settle_hold(
    p_request_id uuid, p_hold_id uuid, p_amount bigint, p_metadata jsonb DEFAULT '{}'::jsonb
)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    RETURN public.tw_ledger_apply_one(p_request_id, 'settle', NULL, p_amount, NULL, p_hold_id,
                                      NULL, p_metadata);
END
$fn$;

CREATE OR REPLACE FUNCTION public.release_hold(
    p_request_id uuid, p_hold_id uuid, p_metadata jsonb DEFAULT '{}'::jsonb
)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    RETURN public.tw_ledger_apply_one(p_request_id, 'release', NULL, NULL, NULL, p_hold_id,
                                      NULL, p_metadata);
END
$fn$;

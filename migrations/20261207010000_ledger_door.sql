-- The ledger's SQL door made cheaper (issue 12). Same public signatures, same rules and outcomes
-- as 20261201095000_ledger_core.sql; what changes:
--   * The rules are expressions in the private schema ledger_rules (below): validation and
--     metadata normalisation (ledger_rules.rejection, ledger_rules.metadata), what a consume,
--     grant or hold does to an account (ledger_rules.decision and its reason) and the door's
--     answer. Inlined by the planner, they cost a batch nothing per operation; the batch path
--     (tw_ledger_apply_core, tw_ledger_check) and the one-operation path use the same ones.
--   * One consume or grant (the SQL door, a queue batch of one) runs tw_ledger_apply_single:
--     one statement reads the bounds, the checks, the stored outcome, the account (unlocked)
--     and the block; the rules decide; ONE guarded UPDATE takes the account's lock and changes
--     it; ONE statement inserts the outcome and the history row; then commit. Nothing else runs
--     between taking the account's lock and the commit, so a hot account is locked as briefly
--     as the data allows. No sub-transaction: a concurrent first use of the same request id is
--     caught by ON CONFLICT on the outcome insert, the account change is undone under the lock
--     still held, and the stored outcome is answered.
--     It replaces the fast path inside tw_ledger_apply_core (arrays, eight array_fill calls,
--     the batch's loop for one element) and, for these two kinds, tw_ledger_apply_one's retry
--     sub-transaction: PL/pgSQL compiles every expression it runs again in each transaction,
--     so a one-operation transaction paid for the batch machinery. consume_tokens_atomic and
--     add_tokens call it directly.
--   * The value lists of ledger_requests.kind/status and token_balance_history.kind become
--     domains (see there).
-- Every function in `public` here is PL/pgSQL with search_path pinned and schema-qualified names.

-- ---------------------------------------------------------------------------------------------
-- The value lists of ledger_requests.kind, ledger_requests.status and token_balance_history.kind
-- move from CHECK constraints to domains over text, with the same lists. PostgreSQL reads a
-- table's CHECK constraints from their stored text (parse, plan, compile) in every statement
-- that inserts or updates the table: for the two 5-to-11-value lists that was ~20 µs of a ~200
-- µs debit through the SQL door (measured). A domain's check is parsed once per session (type
-- cache). Readers see the same text values: a domain column is sent to clients as its base type
-- (text), and compares and casts as text. This migration rewrites both tables once (PostgreSQL
-- re-checks every row under an exclusive lock): expect it to take a while on a large ledger.
-- ---------------------------------------------------------------------------------------------
CREATE DOMAIN public.tw_ledger_kind AS text
    CHECK (VALUE IN ('consume', 'grant', 'hold', 'settle', 'release'));
CREATE DOMAIN public.tw_ledger_status AS text
    CHECK (VALUE IN ('consumed', 'granted', 'held', 'settled', 'released', 'insufficient_tokens',
                     'hold_expired', 'hold_not_found', 'hold_already_resolved', 'rate_limited',
                     'rejected'));
CREATE DOMAIN public.tw_ledger_history_kind AS text
    CHECK (VALUE IN ('grant', 'consume', 'hold', 'settle', 'release', 'expire', 'refund'));

ALTER TABLE public.ledger_requests
    DROP CONSTRAINT ledger_requests_kind_check,
    DROP CONSTRAINT ledger_requests_status_check,
    ALTER COLUMN kind TYPE public.tw_ledger_kind,
    ALTER COLUMN status TYPE public.tw_ledger_status;
ALTER TABLE public.token_balance_history
    DROP CONSTRAINT token_balance_history_kind_check,
    ALTER COLUMN kind TYPE public.tw_ledger_history_kind;

-- ---------------------------------------------------------------------------------------------
-- The rules as expressions, in schema ledger_rules: SQL functions with a SQL-standard body
-- (bound to their objects when created, so no search_path is looked up when they run), no
-- SET clause and a volatility no stricter than their bodies', so the planner inlines them into the calling statement or PL/pgSQL expression:
-- the batch pays nothing per operation for calling them, and the one-operation path evaluates
-- them inside the statements it runs anyway. In `public` the privileges migration would pin
-- their search_path, and a pinned function is never inlined (a call per operation: measured
-- +10 µs per operation in a batch of 1,000). The schema is private: no API role has USAGE on
-- it and its functions are executable by no one but their owner; only the ledger's SECURITY
-- DEFINER functions (which run as that owner, search_path pinned) call them.
-- ---------------------------------------------------------------------------------------------
CREATE SCHEMA ledger_rules;
REVOKE ALL ON SCHEMA ledger_rules FROM PUBLIC;
DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['anon', 'authenticated', 'service_role'] LOOP
        EXECUTE pg_catalog.format('REVOKE ALL ON SCHEMA ledger_rules FROM %I', r);
    END LOOP;
END
$$;

-- An operation's metadata as stored: NULL and JSON null read as {}.
CREATE FUNCTION ledger_rules.metadata(p_metadata jsonb)
RETURNS jsonb
LANGUAGE sql
IMMUTABLE
PARALLEL SAFE
RETURN CASE WHEN p_metadata IS NULL OR pg_catalog.jsonb_typeof(p_metadata) = 'null'
            THEN '{}'::jsonb ELSE p_metadata END;

-- Why an operation is rejected (NULL: it is valid), given its metadata as stored and the bounds
-- of tw_ledger_settings.
CREATE FUNCTION ledger_rules.rejection(
    p_kind text, p_user_id uuid, p_hold_id uuid, p_amount bigint, p_label text,
    p_ttl_secs integer, p_metadata jsonb, p_optype_max integer, p_reason_max integer,
    p_metadata_max integer, p_max_ttl integer
)
RETURNS text
LANGUAGE sql
STABLE
PARALLEL SAFE
RETURN CASE
    WHEN p_kind IS NULL OR p_kind NOT IN ('consume', 'grant', 'hold', 'settle', 'release')
        THEN 'unknown operation kind'
    WHEN p_kind IN ('consume', 'grant', 'hold') AND p_user_id IS NULL
        THEN 'user_id is required'
    WHEN p_kind IN ('settle', 'release') AND p_hold_id IS NULL
        THEN 'hold_id is required'
    WHEN p_kind <> 'release' AND p_amount IS NULL
        THEN 'amount is required'
    WHEN p_kind <> 'release' AND p_amount <= 0
        THEN pg_catalog.format('amount must be a positive integer, got %s', p_amount)
    WHEN p_kind IN ('consume', 'hold')
         AND (p_label IS NULL OR pg_catalog.char_length(p_label) NOT BETWEEN 1 AND p_optype_max)
        THEN pg_catalog.format('operation_type must be 1 to %s characters', p_optype_max)
    WHEN p_kind = 'grant'
         AND (p_label IS NULL OR pg_catalog.char_length(p_label) NOT BETWEEN 1 AND p_reason_max)
        THEN pg_catalog.format('reason must be 1 to %s characters', p_reason_max)
    WHEN pg_catalog.jsonb_typeof(p_metadata) <> 'object'
        THEN 'metadata must be a JSON object'
    WHEN pg_catalog.octet_length(p_metadata::text) > p_metadata_max
        THEN pg_catalog.format('metadata is %s bytes, more than the limit of %s bytes',
                               pg_catalog.octet_length(p_metadata::text), p_metadata_max)
    WHEN p_kind = 'hold' AND (p_ttl_secs IS NULL OR p_ttl_secs < 1 OR p_ttl_secs > p_max_ttl)
        THEN pg_catalog.format('ttl_secs must be between 1 and %s', p_max_ttl)
    END;

-- What a valid, first-seen consume, grant or hold does to its account, given the available
-- balance, the lifetime grants and whether the user is blocked (an open `block` anomaly): the
-- success status (consumed, granted, held) or the refusal (rate_limited, insufficient_tokens;
-- rejected for a grant that would overflow the 64-bit totals). The caller applies a success.
CREATE FUNCTION ledger_rules.decision(
    p_kind text, p_amount bigint, p_blocked boolean, p_balance bigint, p_granted bigint
)
RETURNS text
LANGUAGE sql
IMMUTABLE
PARALLEL SAFE
RETURN CASE
    WHEN p_kind = 'grant'
        THEN CASE WHEN p_amount > 9223372036854775807 - p_balance
                       OR p_amount > 9223372036854775807 - p_granted
                  THEN 'rejected' ELSE 'granted' END
    WHEN p_blocked THEN 'rate_limited'
    WHEN p_balance < p_amount THEN 'insufficient_tokens'
    WHEN p_kind = 'consume' THEN 'consumed'
    ELSE 'held'
    END;

-- The reason given with a refusal of ledger_rules.decision (NULL for a success).
CREATE FUNCTION ledger_rules.decision_reason(p_status text, p_balance bigint, p_amount bigint)
RETURNS text
LANGUAGE sql
STABLE
PARALLEL SAFE
RETURN CASE p_status
    WHEN 'rate_limited' THEN 'the account has an open blocking usage anomaly'
    WHEN 'insufficient_tokens'
        THEN pg_catalog.format('balance %s is less than %s', p_balance, p_amount)
    WHEN 'rejected' THEN 'the grant would overflow the account''s 64-bit totals'
    END;

-- The SQL door's answer: {"success", "status", "request_id", "balance", "held", "error",
-- "reason"}, success for consumed/granted/held/settled/released, error = the status otherwise.
CREATE FUNCTION ledger_rules.answer(
    p_request_id uuid, p_status text, p_balance bigint, p_held bigint, p_reason text
)
RETURNS jsonb
LANGUAGE sql
STABLE
PARALLEL SAFE
RETURN pg_catalog.jsonb_build_object(
    'success', p_status IN ('consumed', 'granted', 'held', 'settled', 'released'),
    'status', p_status, 'request_id', p_request_id, 'balance', p_balance, 'held', p_held,
    'error', CASE WHEN p_status IN ('consumed', 'granted', 'held', 'settled', 'released')
                  THEN NULL ELSE p_status END,
    'reason', p_reason);

REVOKE ALL ON FUNCTION
    ledger_rules.metadata(jsonb),
    ledger_rules.rejection(text, uuid, uuid, bigint, text, integer, jsonb, integer, integer,
                           integer, integer),
    ledger_rules.decision(text, bigint, boolean, bigint, bigint),
    ledger_rules.decision_reason(text, bigint, bigint),
    ledger_rules.answer(uuid, text, bigint, bigint, text)
FROM PUBLIC, anon, authenticated, service_role;

-- tw_ledger_check, redefined: the same result (metadata and rejections of a batch, in order),
-- from ledger_rules.metadata and ledger_rules.rejection.
CREATE OR REPLACE FUNCTION public.tw_ledger_check(
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
           pg_catalog.array_agg(ledger_rules.rejection(t.k, t.u, t.h, t.a, t.l, t.ttl, t.m,
                                                       p_optype_max, p_reason_max,
                                                       p_metadata_max, p_max_ttl)
                                ORDER BY t.ord)
      INTO metadata, rejections
      FROM (SELECT x.ord, x.k, x.u, x.h, x.a, x.l, x.ttl, ledger_rules.metadata(x.m) AS m
              FROM unnest(p_kinds, p_user_ids, p_hold_ids, p_amounts, p_labels, p_ttl_secs,
                          p_metadata) WITH ORDINALITY AS x(k, u, h, a, l, ttl, m, ord)) t;
END
$fn$;

-- ---------------------------------------------------------------------------------------------
-- tw_ledger_apply_single: one consume or grant, with the rules of ledger_rules. Called by
-- tw_ledger_apply_one (the SQL door) and by tw_ledger_apply_core for a batch of one.
--   1. One statement, no lock: the bounds, the stored outcome of the request id, the account
--      and the block. A replay, a conflict, a rejection or a refusal decided here never locks,
--      creates or writes an account.
--   2. A success is written as ONE guarded UPDATE (a grant to a new account: one INSERT) that
--      locks the account and applies the amount only while the decision still holds (the
--      totals stay within 0 .. 2^63-1). If the account changed in between so that it does not,
--      the row is locked, read again and the operation decided again (a second pass).
--   3. ONE statement inserts the outcome and, for a success, the history row. If a concurrent
--      first use of the same request id stored its outcome first (ON CONFLICT), the account
--      change is undone (the lock is still ours, nobody saw it) and that outcome is answered,
--      as a replay or a request_id_conflict.
-- `p_metadata_max_bytes` can only lower the metadata bound for this call (tw_ledger_apply).
-- ---------------------------------------------------------------------------------------------
CREATE FUNCTION public.tw_ledger_apply_single(
    p_request_id uuid, p_kind text, p_user_id uuid, p_amount bigint, p_label text,
    p_hold_id uuid, p_ttl_secs integer, p_metadata jsonb, p_metadata_max_bytes integer,
    OUT request_id uuid, OUT status text, OUT balance bigint, OUT held bigint, OUT reason text
)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
#variable_conflict use_column
DECLARE
    c_max constant bigint := 9223372036854775807;
    v_now timestamptz := pg_catalog.now();
    v record;        -- the first read
    w record;        -- the outcome stored by a concurrent first use
    v_meta jsonb;    -- the metadata as stored
    v_found boolean;
    v_balance bigint;
    v_held bigint;
    v_granted bigint;
    v_created boolean := false;
    v_pass integer := 0;
BEGIN
    IF p_kind IS NULL OR p_kind NOT IN ('consume', 'grant') THEN
        RAISE EXCEPTION 'tw_ledger_apply_single: kind % is not consume or grant', p_kind
            USING ERRCODE = '22023';
    END IF;
    request_id := p_request_id;

    -- 1. Everything the decision needs, unlocked, in one statement: the checks with the bounds,
    --    the stored outcome, the account and the block.
    v_meta := ledger_rules.metadata(p_metadata);
    SELECT ledger_rules.rejection(p_kind, p_user_id, p_hold_id, p_amount, p_label, p_ttl_secs,
                                  v_meta, st.operation_type_max_chars, st.reason_max_chars,
                                  LEAST(st.metadata_max_bytes, p_metadata_max_bytes),
                                  st.max_hold_ttl_secs) AS rejection,
           r.status AS ex_status, r.kind AS ex_kind, r.user_id AS ex_user_id,
           r.hold_id AS ex_hold_id, r.amount AS ex_amount, r.label AS ex_label,
           r.ttl_secs AS ex_ttl_secs, r.metadata AS ex_metadata,
           r.fields_sha256 AS ex_sha256, r.balance_after AS ex_balance,
           r.held_after AS ex_held, r.reason AS ex_reason,
           c.user_id IS NOT NULL AS found, coalesce(c.balance, 0) AS balance,
           coalesce(c.held, 0) AS held, coalesce(c.lifetime_granted, 0) AS granted,
           EXISTS (SELECT 1 FROM public.token_anomalies an
                    WHERE an.user_id = p_user_id AND an.severity = 'block'
                      AND an.resolved_at IS NULL) AS blocked
      INTO v
      FROM public.tw_ledger_settings st
      LEFT JOIN public.ledger_requests r ON r.request_id = p_request_id
      LEFT JOIN public.credit_accounts c ON c.user_id = p_user_id
     WHERE st.id = 1;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'tw_ledger_apply: public.tw_ledger_settings has no row'
            USING ERRCODE = '55000';
    END IF;

    -- Seen before: its stored outcome, or a conflict (as in the batch path).
    IF v.ex_status IS NOT NULL THEN
        IF public.tw_ledger_same_stored(v.ex_kind, v.ex_user_id, v.ex_hold_id, v.ex_amount,
                                        v.ex_label, v.ex_ttl_secs, v.ex_metadata, v.ex_sha256,
                                        p_kind, p_user_id, p_hold_id, p_amount, p_label,
                                        p_ttl_secs, v_meta) THEN
            status := v.ex_status;
            balance := v.ex_balance;
            held := v.ex_held;
            reason := v.ex_reason;
        ELSE
            status := 'request_id_conflict';
            reason := 'request id already used with different fields';
        END IF;
        RETURN;
    END IF;
    IF p_request_id IS NULL THEN
        status := 'rejected';
        reason := 'request_id is required';
        RETURN;
    END IF;

    IF v.rejection IS NOT NULL THEN
        status := 'rejected';
        reason := v.rejection;
    ELSE
        -- 2. Decide; write a success with one guarded statement that takes the account's lock.
        v_found := v.found;
        v_balance := v.balance;
        v_held := v.held;
        v_granted := v.granted;
        LOOP
            v_pass := v_pass + 1;
            status := ledger_rules.decision(p_kind, p_amount, v.blocked, v_balance, v_granted);
            reason := ledger_rules.decision_reason(status, v_balance, p_amount);
            balance := v_balance;
            held := v_held;
            EXIT WHEN status NOT IN ('consumed', 'granted');
            IF p_kind = 'consume' THEN
                UPDATE public.credit_accounts c
                   SET balance = c.balance - p_amount,
                       lifetime_consumed = c.lifetime_consumed + p_amount, updated_at = v_now
                 WHERE c.user_id = p_user_id AND c.balance >= p_amount
                RETURNING c.balance, c.held INTO balance, held;
            ELSIF v_found THEN
                UPDATE public.credit_accounts c
                   SET balance = c.balance + p_amount,
                       lifetime_granted = c.lifetime_granted + p_amount, updated_at = v_now
                 WHERE c.user_id = p_user_id AND c.balance <= c_max - p_amount
                   AND c.lifetime_granted <= c_max - p_amount
                RETURNING c.balance, c.held INTO balance, held;
            ELSE
                INSERT INTO public.credit_accounts AS c
                       (user_id, balance, lifetime_granted, created_at, updated_at)
                VALUES (p_user_id, p_amount, p_amount, v_now, v_now)
                ON CONFLICT (user_id) DO NOTHING
                RETURNING c.balance, c.held INTO balance, held;
                v_created := FOUND;
            END IF;
            EXIT WHEN FOUND;
            -- The account changed since the read: decide again on the locked row.
            IF v_pass >= 3 THEN
                RAISE EXCEPTION 'tw_ledger_apply: account % kept changing', p_user_id
                    USING ERRCODE = '40001';
            END IF;
            SELECT c.balance, c.held, c.lifetime_granted
              INTO v_balance, v_held, v_granted
              FROM public.credit_accounts c
             WHERE c.user_id = p_user_id
               FOR UPDATE;
            v_found := FOUND;
            IF NOT v_found THEN
                v_balance := 0;
                v_held := 0;
                v_granted := 0;
            END IF;
        END LOOP;
    END IF;

    -- 3. The outcome and, for a success, the history row.
    IF status IN ('consumed', 'granted') THEN
        WITH outcome AS (
            INSERT INTO public.ledger_requests AS l
                   (request_id, kind, user_id, hold_id, amount, label, ttl_secs, metadata,
                    status, balance_after, held_after, created_at)
            VALUES (p_request_id, p_kind, p_user_id, p_hold_id, p_amount, p_label, p_ttl_secs,
                    v_meta, status, balance, held, v_now)
            ON CONFLICT (request_id) DO NOTHING
            RETURNING l.request_id
        )
        INSERT INTO public.token_balance_history
               (user_id, request_id, kind, amount, balance_after, held_after, operation_type,
                metadata, created_at)
        SELECT p_user_id, o.request_id, p_kind, p_amount, balance, held, p_label, v_meta,
               v_now
          FROM outcome o;
        IF NOT FOUND THEN
            -- Lost the race for the request id: undo the change, answer the stored outcome.
            IF v_created THEN
                DELETE FROM public.credit_accounts c WHERE c.user_id = p_user_id;
            ELSIF p_kind = 'consume' THEN
                UPDATE public.credit_accounts c
                   SET balance = c.balance + p_amount,
                       lifetime_consumed = c.lifetime_consumed - p_amount
                 WHERE c.user_id = p_user_id;
            ELSE
                UPDATE public.credit_accounts c
                   SET balance = c.balance - p_amount,
                       lifetime_granted = c.lifetime_granted - p_amount
                 WHERE c.user_id = p_user_id;
            END IF;
            status := NULL;
        END IF;
    ELSE
        INSERT INTO public.ledger_requests AS l
               (request_id, kind, user_id, hold_id, amount, label, ttl_secs, metadata,
                fields_sha256, status, balance_after, held_after, reason, created_at)
        VALUES (p_request_id, p_kind, p_user_id, p_hold_id, p_amount,
                CASE WHEN status = 'rejected'
                     THEN public.tw_ledger_kept_label(p_label) ELSE p_label END,
                p_ttl_secs,
                CASE WHEN status = 'rejected'
                     THEN public.tw_ledger_kept_metadata(v_meta) ELSE v_meta END,
                CASE WHEN status = 'rejected'
                     THEN public.tw_ledger_fields_sha256(p_kind, p_user_id, p_hold_id, p_amount,
                                                         p_label, p_ttl_secs, v_meta) END,
                status, balance, held, reason, v_now)
        ON CONFLICT (request_id) DO NOTHING;
        IF NOT FOUND THEN
            status := NULL;
        END IF;
    END IF;
    IF status IS NOT NULL THEN
        RETURN;
    END IF;

    -- The concurrent first use committed its outcome (ON CONFLICT waited for it).
    SELECT l.kind, l.user_id, l.hold_id, l.amount, l.label, l.ttl_secs, l.metadata,
           l.fields_sha256, l.status, l.balance_after, l.held_after, l.reason
      INTO STRICT w
      FROM public.ledger_requests l
     WHERE l.request_id = p_request_id;
    IF public.tw_ledger_same_stored(w.kind, w.user_id, w.hold_id, w.amount, w.label, w.ttl_secs,
                                    w.metadata, w.fields_sha256, p_kind, p_user_id, p_hold_id,
                                    p_amount, p_label, p_ttl_secs, v_meta) THEN
        status := w.status;
        balance := w.balance_after;
        held := w.held_after;
        reason := w.reason;
    ELSE
        status := 'request_id_conflict';
        balance := NULL;
        held := NULL;
        reason := 'request id already used with different fields';
    END IF;
END
$fn$;

-- ---------------------------------------------------------------------------------------------
-- tw_ledger_apply_core, redefined: a batch as before (steps 1-5: lock every touched account
-- once in user_id order, read holds and stored outcomes set-based, evaluate in memory, one
-- UPDATE per account and bulk inserts), its rules now from ledger_rules (validation via
-- tw_ledger_check, ledger_rules.decision in step 4); one consume or grant goes to tw_ledger_apply_single.
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

    -- One consume or grant (the SQL door's call, a quiet queue's batch of one): one guarded
    -- UPDATE and one insert, by tw_ledger_apply_single, with the same rules.
    IF n = 1 AND p_kinds[1] IN ('consume', 'grant') THEN
        RETURN QUERY
        SELECT x.request_id, x.status, x.balance, x.held, x.reason
          FROM public.tw_ledger_apply_single(p_request_ids[1], p_kinds[1], p_user_ids[1],
                                             p_amounts[1], p_labels[1], p_hold_ids[1],
                                             p_ttl_secs[1], p_metadata[1],
                                             p_metadata_max_bytes) x;
        RETURN;
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
            o_status[i] := ledger_rules.decision(k, a, a_blocked[s], a_balance[s], a_granted[s]);
            o_reason[i] := ledger_rules.decision_reason(o_status[i], a_balance[s], a);
            IF o_status[i] = 'consumed' THEN
                a_balance[s] := a_balance[s] - a;
                a_consumed[s] := a_consumed[s] + a;
            END IF;
            o_balance[i] := a_balance[s];
            o_held[i] := a_held[s];

        ELSIF k = 'grant' THEN
            s := op_slot[i];
            IF NOT a_found[s] THEN
                -- Step 1 inserted (or waited for a concurrent insert of) this account
                -- before the lock query, so it must have been seen; if not, retry the
                -- whole batch rather than lose the grant.
                RAISE EXCEPTION 'tw_ledger_apply: account % of a grant was not locked', a_user[s]
                    USING ERRCODE = '40001';
            END IF;
            o_status[i] := ledger_rules.decision(k, a, a_blocked[s], a_balance[s], a_granted[s]);
            o_reason[i] := ledger_rules.decision_reason(o_status[i], a_balance[s], a);
            IF o_status[i] = 'granted' THEN
                a_balance[s] := a_balance[s] + a;
                a_granted[s] := a_granted[s] + a;
            END IF;
            o_balance[i] := a_balance[s];
            o_held[i] := a_held[s];

        ELSIF k = 'hold' THEN
            s := op_slot[i];
            hs := op_hslot[i];
            o_status[i] := ledger_rules.decision(k, a, a_blocked[s], a_balance[s], a_granted[s]);
            IF o_status[i] <> 'held' THEN
                o_reason[i] := ledger_rules.decision_reason(o_status[i], a_balance[s], a);
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
END
$fn$;
-- tw_ledger_reject, redefined unchanged but for one cast: the stored status is a
-- public.tw_ledger_status now, and RETURN QUERY wants the declared text.
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
        RETURN QUERY SELECT p_request_id, r.status::text, r.balance_after, r.held_after, r.reason;
    ELSE
        RETURN QUERY SELECT p_request_id, 'request_id_conflict'::text, NULL::bigint,
                            NULL::bigint, 'request id already used with different fields'::text;
    END IF;
END
$fn$;

-- tw_ledger_apply_one, redefined: a consume or grant goes straight to tw_ledger_apply_single
-- (no sub-transaction: it settles a racing duplicate request id itself). A hold, settle or
-- release goes through tw_ledger_apply_core with the retry as before: a concurrent first use of
-- the same request id makes the outcome insert collide (unique_violation), and the next attempt
-- finds the stored outcome.
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
    IF p_kind IN ('consume', 'grant') THEN
        r := public.tw_ledger_apply_single(p_request_id, p_kind, p_user_id, p_amount, p_label,
                                           p_hold_id, p_ttl_secs, p_metadata, NULL);
    ELSE
        FOR attempt IN 1 .. 3 LOOP
            BEGIN
                SELECT * INTO r
                  FROM public.tw_ledger_apply_core(
                      ARRAY[p_request_id], ARRAY[p_kind], ARRAY[p_user_id], ARRAY[p_amount],
                      ARRAY[p_label], ARRAY[p_hold_id], ARRAY[p_ttl_secs], ARRAY[p_metadata]);
                EXIT;
            EXCEPTION WHEN unique_violation OR serialization_failure THEN
                IF attempt = 3 THEN
                    RAISE;
                END IF;
            END;
        END LOOP;
    END IF;
    RETURN ledger_rules.answer(r.request_id, r.status, r.balance, r.held, r.reason);
END
$fn$;

-- consume_tokens_atomic and add_tokens, redefined with the same signatures, defaults and
-- answers: they call tw_ledger_apply_single directly (one PL/pgSQL level less).
CREATE OR REPLACE FUNCTION public.consume_tokens_atomic(
    p_request_id uuid, p_user_id uuid, p_token_amount bigint, p_operation_type text,
    p_metadata jsonb DEFAULT '{}'::jsonb
)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    r record;
BEGIN
    r := public.tw_ledger_apply_single(p_request_id, 'consume', p_user_id, p_token_amount,
                                       p_operation_type, NULL, NULL, p_metadata, NULL);
    RETURN ledger_rules.answer(r.request_id, r.status, r.balance, r.held, r.reason);
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
DECLARE
    r record;
BEGIN
    r := public.tw_ledger_apply_single(coalesce(p_request_id, pg_catalog.gen_random_uuid()),
                                       'grant', p_user_id, p_amount, p_reason, NULL, NULL,
                                       p_metadata, NULL);
    RETURN ledger_rules.answer(r.request_id, r.status, r.balance, r.held, r.reason);
END
$fn$;

-- The new function is for the ledger's own use: the API roles get nothing (Supabase's default
-- privileges would grant them EXECUTE). The privileges migration repeats this from
-- security/privileges.txt.
REVOKE ALL ON FUNCTION
    public.tw_ledger_apply_single(uuid, text, uuid, bigint, text, uuid, integer, jsonb, integer)
FROM PUBLIC, anon, authenticated, service_role;

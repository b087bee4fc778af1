-- Credits ledger: accounts, durable request outcomes, append-only history, holds, anomalies,
-- and the SQL functions that apply ledger operations.
--
-- The rules live in ONE function, public.tw_ledger_apply (a batch of operations). The queue path
-- (Rust `Ledger::apply`) calls it with up to `ledger.max_batch` operations per transaction; the
-- synchronous SQL door (consume_tokens_atomic, add_tokens, hold_tokens, settle_hold, release_hold)
-- calls it with one. Both doors therefore give identical outcomes.

-- ---------------------------------------------------------------------------------------------
-- Tables
-- ---------------------------------------------------------------------------------------------

-- One row per user who ever received credits. `balance` is the AVAILABLE balance; tokens
-- reserved by open holds are in `held`.
CREATE TABLE public.credit_accounts (
    user_id           uuid PRIMARY KEY,
    balance           bigint NOT NULL DEFAULT 0 CHECK (balance >= 0),
    held              bigint NOT NULL DEFAULT 0 CHECK (held >= 0),
    lifetime_granted  bigint NOT NULL DEFAULT 0 CHECK (lifetime_granted >= 0),
    lifetime_consumed bigint NOT NULL DEFAULT 0 CHECK (lifetime_consumed >= 0),
    created_at        timestamptz NOT NULL DEFAULT pg_catalog.now(),
    updated_at        timestamptz NOT NULL DEFAULT pg_catalog.now()
) WITH (fillfactor = 70);

-- The durable outcome of every request id: the first time an id is seen decides its outcome,
-- including failures (insufficient_tokens, rejected, ...). `fingerprint` is the md5 of the
-- caller-supplied fields; a repeat with another fingerprint is a request_id_conflict.
CREATE TABLE public.ledger_requests (
    request_id    uuid PRIMARY KEY,
    kind          text NOT NULL CHECK (kind IN ('consume', 'grant', 'hold', 'settle', 'release')),
    user_id       uuid NULL,
    hold_id       uuid NULL,
    amount        bigint NULL,
    fingerprint   text NOT NULL,
    status        text NOT NULL CHECK (status IN (
        'consumed', 'granted', 'held', 'settled', 'released', 'insufficient_tokens',
        'hold_expired', 'hold_not_found', 'hold_already_resolved', 'rate_limited', 'rejected')),
    balance_after bigint NULL,
    held_after    bigint NULL,
    reason        text NULL,
    created_at    timestamptz NOT NULL DEFAULT pg_catalog.now()
);
CREATE INDEX ledger_requests_user_idx ON public.ledger_requests (user_id, created_at);

-- Append-only: one row per balance change. `amount` is the operation's (positive) amount; `kind`
-- says the direction: grant adds to balance; consume takes from balance; hold moves from balance
-- to held; settle charges `amount` from held (the rest of the hold returns to balance, see
-- held_after/balance_after); release and expire return `amount` from held to balance.
CREATE TABLE public.token_balance_history (
    id             bigserial PRIMARY KEY,
    user_id        uuid NOT NULL,
    request_id     uuid NOT NULL,
    hold_id        uuid NULL,
    kind           text NOT NULL CHECK (kind IN ('grant', 'consume', 'hold', 'settle', 'release', 'expire', 'refund')),
    amount         bigint NOT NULL,
    balance_after  bigint NOT NULL,
    held_after     bigint NOT NULL,
    operation_type text NULL,
    metadata       jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at     timestamptz NOT NULL DEFAULT pg_catalog.now()
);
CREATE INDEX token_balance_history_user_idx ON public.token_balance_history (user_id, id DESC);

-- Holds (two-phase consumption). hold_id = the request id of the hold operation.
CREATE TABLE public.token_consumption_locks (
    hold_id        uuid PRIMARY KEY,
    user_id        uuid NOT NULL,
    amount         bigint NOT NULL CHECK (amount > 0),
    operation_type text NOT NULL,
    status         text NOT NULL CHECK (status IN ('held', 'settled', 'released', 'expired')),
    settled_amount bigint NULL,
    metadata       jsonb NOT NULL DEFAULT '{}'::jsonb,
    expires_at     timestamptz NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT pg_catalog.now(),
    resolved_at    timestamptz NULL
);
CREATE INDEX token_consumption_locks_user_idx ON public.token_consumption_locks (user_id);
CREATE INDEX token_consumption_locks_open_expiry_idx
    ON public.token_consumption_locks (expires_at) WHERE status = 'held';

-- Usage anomalies, filled by the maintenance engine. An open (resolved_at IS NULL) 'block' row
-- makes consume and hold return rate_limited.
CREATE TABLE public.token_anomalies (
    id           bigserial PRIMARY KEY,
    user_id      uuid NOT NULL,
    rule         text NOT NULL,
    severity     text NOT NULL CHECK (severity IN ('info', 'warn', 'block')),
    window_start timestamptz NOT NULL,
    window_end   timestamptz NULL,
    details      jsonb NOT NULL DEFAULT '{}'::jsonb,
    detected_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    resolved_at  timestamptz NULL,
    UNIQUE (user_id, rule, window_start)
);
CREATE INDEX token_anomalies_open_block_idx
    ON public.token_anomalies (user_id) WHERE severity = 'block' AND resolved_at IS NULL;

-- ---------------------------------------------------------------------------------------------
-- Row Level Security: users read their own rows; nobody but the owner (the worker) and the
-- SECURITY DEFINER functions below writes.
-- ---------------------------------------------------------------------------------------------

ALTER TABLE public.credit_accounts ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.ledger_requests ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.token_balance_history ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.token_consumption_locks ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.token_anomalies ENABLE ROW LEVEL SECURITY;

CREATE POLICY credit_accounts_select_own ON public.credit_accounts
    FOR SELECT TO authenticated USING ((SELECT auth.uid()) = user_id);
CREATE POLICY ledger_requests_select_own ON public.ledger_requests
    FOR SELECT TO authenticated USING ((SELECT auth.uid()) = user_id);
CREATE POLICY token_balance_history_select_own ON public.token_balance_history
    FOR SELECT TO authenticated USING ((SELECT auth.uid()) = user_id);
CREATE POLICY token_consumption_locks_select_own ON public.token_consumption_locks
    FOR SELECT TO authenticated USING ((SELECT auth.uid()) = user_id);
CREATE POLICY token_anomalies_select_own ON public.token_anomalies
    FOR SELECT TO authenticated USING ((SELECT auth.uid()) = user_id);

-- Supabase's default privileges grant everything on public tables to anon/authenticated; take
-- the write privileges back (RLS without write policies already refuses them: belt and braces).
REVOKE ALL ON public.credit_accounts, public.ledger_requests, public.token_balance_history,
    public.token_consumption_locks, public.token_anomalies FROM anon, authenticated, service_role;
GRANT SELECT ON public.credit_accounts, public.ledger_requests, public.token_balance_history,
    public.token_consumption_locks, public.token_anomalies TO anon, authenticated, service_role;

-- ---------------------------------------------------------------------------------------------
-- tw_ledger_apply: the one implementation of the ledger rules.
--
-- Input: parallel arrays, one element per operation, applied in array (arrival) order, each
-- operation seeing the effects of the previous ones.
--   p_kinds       'consume' | 'grant' | 'hold' | 'settle' | 'release'
--   p_user_ids    consume/grant/hold: the account; settle/release: NULL (the hold decides)
--   p_amounts     consume/grant/hold/settle: > 0; release: NULL
--   p_labels      consume/hold: operation_type (1..100 chars); grant: reason (1..200); else NULL
--   p_hold_ids    settle/release: the hold (= the hold's request id); else NULL
--   p_ttl_secs    hold: 1..p_max_ttl_secs; else NULL
--   p_metadata    a JSON object (NULL means {}), at most p_metadata_max_bytes as jsonb text
-- Output: one row per input operation, in input order.
--
-- Shape of the work (it is the hot path, hence the arrays): lock every touched account once in
-- user_id order (no deadlocks between concurrent batches), evaluate the operations in memory,
-- then write ONE update per account, one bulk insert of history rows and one of request
-- outcomes. Repeated UPDATEs of one hot row within a transaction would grow its HOT chain
-- quadratically.
-- ---------------------------------------------------------------------------------------------

CREATE FUNCTION public.tw_ledger_apply(
    p_request_ids uuid[],
    p_kinds text[],
    p_user_ids uuid[],
    p_amounts bigint[],
    p_labels text[],
    p_hold_ids uuid[],
    p_ttl_secs integer[],
    p_metadata jsonb[],
    p_metadata_max_bytes integer DEFAULT 4096,
    p_max_ttl_secs integer DEFAULT 86400
)
RETURNS TABLE (request_id uuid, status text, balance bigint, held bigint, reason text)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $fn$
#variable_conflict use_column
DECLARE
    n integer := coalesce(pg_catalog.array_length(p_request_ids, 1), 0);
    v_now timestamptz := pg_catalog.now();
    c_max constant bigint := 9223372036854775807;
    -- per operation
    op_meta jsonb[];
    op_mlen integer[];
    op_fp text[];
    op_first integer[];
    op_slot integer[];
    op_hslot integer[];
    ex_status text[];
    ex_fp text[];
    ex_balance bigint[];
    ex_held bigint[];
    ex_reason text[];
    o_status text[];
    o_balance bigint[];
    o_held bigint[];
    o_reason text[];
    o_store boolean[];
    o_user uuid[];
    -- accounts (slots, sorted by user id)
    v_users uuid[];
    a_user uuid[];
    a_balance bigint[];
    a_held bigint[];
    a_granted bigint[];
    a_consumed bigint[];
    a_blocked boolean[];
    a_dirty boolean[];
    -- holds (slots)
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
    -- history rows to insert
    hc integer := 0;
    hi_user uuid[];
    hi_rid uuid[];
    hi_hold uuid[];
    hi_kind text[];
    hi_amount bigint[];
    hi_bal bigint[];
    hi_held bigint[];
    hi_op text[];
    hi_meta jsonb[];
    -- loop state
    i integer;
    f integer;
    s integer;
    hs integer;
    k text;
    a bigint;
    lbl text;
    v_reason text;
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

    -- 1. Normalise metadata, fingerprint each operation, find the first occurrence of each id.
    SELECT pg_catalog.array_agg(t.m ORDER BY t.ord),
           pg_catalog.array_agg(pg_catalog.octet_length(t.m::text) ORDER BY t.ord),
           pg_catalog.array_agg(pg_catalog.md5(pg_catalog.jsonb_build_array(
               t.k, t.u, t.h, t.a, t.l, t.ttl, t.m)::text) ORDER BY t.ord),
           pg_catalog.array_agg(t.first_ord::integer ORDER BY t.ord)
      INTO op_meta, op_mlen, op_fp, op_first
      FROM (
        SELECT x.ord, x.k, x.u, x.h, x.a, x.l, x.ttl,
               CASE WHEN x.m IS NULL OR pg_catalog.jsonb_typeof(x.m) = 'null'
                    THEN '{}'::jsonb ELSE x.m END AS m,
               pg_catalog.min(x.ord) OVER (PARTITION BY x.rid) AS first_ord
          FROM unnest(p_request_ids, p_kinds, p_user_ids, p_hold_ids, p_amounts, p_labels,
                      p_ttl_secs, p_metadata)
               WITH ORDINALITY AS x(rid, k, u, h, a, l, ttl, m, ord)
      ) t;

    -- 2. Accounts: create the ones grants need, then lock every touched account in user_id
    --    order. Settle/release touch the account of their hold (a hold's user never changes).
    INSERT INTO public.credit_accounts (user_id)
    SELECT DISTINCT x.u
      FROM unnest(p_kinds, p_user_ids, p_amounts) AS x(k, u, a)
     WHERE x.k = 'grant' AND x.u IS NOT NULL AND x.a > 0
     ORDER BY x.u
    ON CONFLICT (user_id) DO NOTHING;

    SELECT pg_catalog.array_agg(DISTINCT z.u ORDER BY z.u)
      INTO v_users
      FROM (
        SELECT x.u FROM unnest(p_kinds, p_user_ids) AS x(k, u)
         WHERE x.k IN ('consume', 'grant', 'hold') AND x.u IS NOT NULL
        UNION ALL
        SELECT l.user_id FROM public.token_consumption_locks l
         WHERE l.hold_id = ANY (p_hold_ids)
      ) z;
    v_users := coalesce(v_users, '{}'::uuid[]);

    PERFORM 1
      FROM (SELECT c.user_id FROM public.credit_accounts c
             WHERE c.user_id = ANY (v_users)
             ORDER BY c.user_id
               FOR UPDATE) locked;

    -- Under the locks: the current state of every touched account (absent account = zeros).
    SELECT pg_catalog.array_agg(u.uid ORDER BY u.slot),
           pg_catalog.array_agg(coalesce(c.balance, 0) ORDER BY u.slot),
           pg_catalog.array_agg(coalesce(c.held, 0) ORDER BY u.slot),
           pg_catalog.array_agg(coalesce(c.lifetime_granted, 0) ORDER BY u.slot),
           pg_catalog.array_agg(coalesce(c.lifetime_consumed, 0) ORDER BY u.slot),
           pg_catalog.array_agg(EXISTS (
               SELECT 1 FROM public.token_anomalies an
                WHERE an.user_id = u.uid AND an.severity = 'block' AND an.resolved_at IS NULL)
               ORDER BY u.slot),
           pg_catalog.array_agg(false ORDER BY u.slot)
      INTO a_user, a_balance, a_held, a_granted, a_consumed, a_blocked, a_dirty
      FROM unnest(v_users) WITH ORDINALITY AS u(uid, slot)
      LEFT JOIN public.credit_accounts c ON c.user_id = u.uid;

    -- 3. Holds referenced by the batch (settle/release targets and holds created here).
    SELECT pg_catalog.array_agg(hh.hid ORDER BY hh.hid)
      INTO h_id
      FROM (SELECT DISTINCT CASE WHEN x.k IN ('settle', 'release') THEN x.h
                                 WHEN x.k = 'hold' THEN x.rid END AS hid
              FROM unnest(p_kinds, p_hold_ids, p_request_ids) AS x(k, h, rid)) hh
     WHERE hh.hid IS NOT NULL;
    h_id := coalesce(h_id, '{}'::uuid[]);

    SELECT pg_catalog.array_agg(au.slot::integer ORDER BY hx.slot),
           pg_catalog.array_agg(l.amount ORDER BY hx.slot),
           pg_catalog.array_agg(l.status ORDER BY hx.slot),
           pg_catalog.array_agg(l.expires_at ORDER BY hx.slot),
           pg_catalog.array_agg(l.settled_amount ORDER BY hx.slot),
           pg_catalog.array_agg(l.operation_type ORDER BY hx.slot),
           pg_catalog.array_agg(l.metadata ORDER BY hx.slot),
           pg_catalog.array_agg(false ORDER BY hx.slot),
           pg_catalog.array_agg(false ORDER BY hx.slot)
      INTO h_slot, h_amount, h_status, h_expires, h_settled, h_optype, h_meta, h_new, h_dirty
      FROM unnest(h_id) WITH ORDINALITY AS hx(hid, slot)
      LEFT JOIN public.token_consumption_locks l ON l.hold_id = hx.hid
      LEFT JOIN unnest(a_user) WITH ORDINALITY AS au(uid, slot) ON au.uid = l.user_id;

    -- 4. Per operation: its account slot, its hold slot, and any stored outcome of its id
    --    (read after the locks, so a concurrent batch's commit on these accounts is visible).
    SELECT pg_catalog.array_agg(au.slot::integer ORDER BY x.ord),
           pg_catalog.array_agg(hx.slot::integer ORDER BY x.ord),
           pg_catalog.array_agg(r.status ORDER BY x.ord),
           pg_catalog.array_agg(r.fingerprint ORDER BY x.ord),
           pg_catalog.array_agg(r.balance_after ORDER BY x.ord),
           pg_catalog.array_agg(r.held_after ORDER BY x.ord),
           pg_catalog.array_agg(r.reason ORDER BY x.ord)
      INTO op_slot, op_hslot, ex_status, ex_fp, ex_balance, ex_held, ex_reason
      FROM unnest(p_request_ids, p_kinds, p_user_ids, p_hold_ids)
           WITH ORDINALITY AS x(rid, k, u, h, ord)
      LEFT JOIN unnest(a_user) WITH ORDINALITY AS au(uid, slot)
             ON x.k IN ('consume', 'grant', 'hold') AND au.uid = x.u
      LEFT JOIN unnest(h_id) WITH ORDINALITY AS hx(hid, slot)
             ON hx.hid = CASE WHEN x.k = 'hold' THEN x.rid ELSE x.h END
      LEFT JOIN public.ledger_requests r ON r.request_id = x.rid;

    o_status := pg_catalog.array_fill(NULL::text, ARRAY[n]);
    o_balance := pg_catalog.array_fill(NULL::bigint, ARRAY[n]);
    o_held := pg_catalog.array_fill(NULL::bigint, ARRAY[n]);
    o_reason := pg_catalog.array_fill(NULL::text, ARRAY[n]);
    o_store := pg_catalog.array_fill(false, ARRAY[n]);
    o_user := pg_catalog.array_fill(NULL::uuid, ARRAY[n]);

    -- 5. Evaluate in arrival order.
    FOR i IN 1 .. n LOOP
        IF p_request_ids[i] IS NULL THEN
            o_status[i] := 'rejected';
            o_reason[i] := 'request_id is required';
            CONTINUE;
        END IF;
        IF ex_status[i] IS NOT NULL THEN
            IF ex_fp[i] = op_fp[i] THEN
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
        f := op_first[i];
        IF f <> i THEN
            IF op_fp[f] = op_fp[i] THEN
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

        k := p_kinds[i];
        a := p_amounts[i];
        lbl := p_labels[i];
        s := op_slot[i];
        hs := op_hslot[i];

        -- Validation (the Rust types check most of this too; this is the SQL door's guard).
        v_reason := CASE
            WHEN k IS NULL OR k NOT IN ('consume', 'grant', 'hold', 'settle', 'release')
                THEN 'unknown operation kind'
            WHEN k IN ('consume', 'grant', 'hold') AND p_user_ids[i] IS NULL
                THEN 'user_id is required'
            WHEN k IN ('settle', 'release') AND p_hold_ids[i] IS NULL
                THEN 'hold_id is required'
            WHEN k <> 'release' AND a IS NULL
                THEN 'amount is required'
            WHEN k <> 'release' AND a <= 0
                THEN pg_catalog.format('amount must be a positive integer, got %s', a)
            WHEN k IN ('consume', 'hold')
                 AND (lbl IS NULL OR pg_catalog.char_length(lbl) NOT BETWEEN 1 AND 100)
                THEN 'operation_type must be 1 to 100 characters'
            WHEN k = 'grant'
                 AND (lbl IS NULL OR pg_catalog.char_length(lbl) NOT BETWEEN 1 AND 200)
                THEN 'reason must be 1 to 200 characters'
            WHEN pg_catalog.jsonb_typeof(op_meta[i]) <> 'object'
                THEN 'metadata must be a JSON object'
            WHEN op_mlen[i] > p_metadata_max_bytes
                THEN pg_catalog.format('metadata is %s bytes, more than the limit of %s bytes',
                                       op_mlen[i], p_metadata_max_bytes)
            WHEN k = 'hold' AND (p_ttl_secs[i] IS NULL OR p_ttl_secs[i] < 1
                                 OR p_ttl_secs[i] > p_max_ttl_secs)
                THEN pg_catalog.format('ttl_secs must be between 1 and %s', p_max_ttl_secs)
            END;
        IF v_reason IS NOT NULL THEN
            o_status[i] := 'rejected';
            o_reason[i] := v_reason;
            -- An unknown kind cannot be stored (ledger_requests.kind is checked).
            o_store[i] := k IN ('consume', 'grant', 'hold', 'settle', 'release');
            IF k IN ('consume', 'grant', 'hold') THEN
                o_user[i] := p_user_ids[i];
            END IF;
            CONTINUE;
        END IF;
        o_store[i] := true;

        IF k = 'consume' THEN
            o_user[i] := p_user_ids[i];
            IF a_blocked[s] THEN
                o_status[i] := 'rate_limited';
                o_reason[i] := 'the account has an open blocking usage anomaly';
            ELSIF a_balance[s] < a THEN
                o_status[i] := 'insufficient_tokens';
                o_reason[i] := pg_catalog.format('balance %s is less than %s', a_balance[s], a);
            ELSE
                a_balance[s] := a_balance[s] - a;
                a_consumed[s] := a_consumed[s] + a;
                a_dirty[s] := true;
                hc := hc + 1;
                hi_user[hc] := a_user[s]; hi_rid[hc] := p_request_ids[i]; hi_hold[hc] := NULL;
                hi_kind[hc] := 'consume'; hi_amount[hc] := a; hi_bal[hc] := a_balance[s];
                hi_held[hc] := a_held[s]; hi_op[hc] := lbl; hi_meta[hc] := op_meta[i];
                o_status[i] := 'consumed';
            END IF;
            o_balance[i] := a_balance[s];
            o_held[i] := a_held[s];

        ELSIF k = 'grant' THEN
            o_user[i] := p_user_ids[i];
            IF a > c_max - a_balance[s] OR a > c_max - a_granted[s] THEN
                o_status[i] := 'rejected';
                o_reason[i] := 'the grant would overflow the account''s 64-bit totals';
            ELSE
                a_balance[s] := a_balance[s] + a;
                a_granted[s] := a_granted[s] + a;
                a_dirty[s] := true;
                hc := hc + 1;
                hi_user[hc] := a_user[s]; hi_rid[hc] := p_request_ids[i]; hi_hold[hc] := NULL;
                hi_kind[hc] := 'grant'; hi_amount[hc] := a; hi_bal[hc] := a_balance[s];
                hi_held[hc] := a_held[s]; hi_op[hc] := lbl; hi_meta[hc] := op_meta[i];
                o_status[i] := 'granted';
            END IF;
            o_balance[i] := a_balance[s];
            o_held[i] := a_held[s];

        ELSIF k = 'hold' THEN
            o_user[i] := p_user_ids[i];
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
                a_dirty[s] := true;
                h_slot[hs] := s; h_amount[hs] := a; h_status[hs] := 'held';
                h_expires[hs] := v_now + pg_catalog.make_interval(secs => p_ttl_secs[i]);
                h_optype[hs] := lbl; h_meta[hs] := op_meta[i]; h_new[hs] := true;
                hc := hc + 1;
                hi_user[hc] := a_user[s]; hi_rid[hc] := p_request_ids[i];
                hi_hold[hc] := p_request_ids[i];
                hi_kind[hc] := 'hold'; hi_amount[hc] := a; hi_bal[hc] := a_balance[s];
                hi_held[hc] := a_held[s]; hi_op[hc] := lbl; hi_meta[hc] := op_meta[i];
                o_status[i] := 'held';
            END IF;
            o_balance[i] := a_balance[s];
            o_held[i] := a_held[s];

        ELSE -- settle / release
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
                a_dirty[s] := true;
                h_status[hs] := 'expired'; h_dirty[hs] := true;
                hc := hc + 1;
                hi_user[hc] := a_user[s]; hi_rid[hc] := p_request_ids[i]; hi_hold[hc] := h_id[hs];
                hi_kind[hc] := 'expire'; hi_amount[hc] := h_amount[hs];
                hi_bal[hc] := a_balance[s]; hi_held[hc] := a_held[s]; hi_op[hc] := h_optype[hs];
                hi_meta[hc] := op_meta[i];
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
                a_dirty[s] := true;
                h_status[hs] := 'settled'; h_settled[hs] := a; h_dirty[hs] := true;
                hc := hc + 1;
                hi_user[hc] := a_user[s]; hi_rid[hc] := p_request_ids[i]; hi_hold[hc] := h_id[hs];
                hi_kind[hc] := 'settle'; hi_amount[hc] := a;
                hi_bal[hc] := a_balance[s]; hi_held[hc] := a_held[s]; hi_op[hc] := h_optype[hs];
                hi_meta[hc] := op_meta[i];
                o_status[i] := 'settled';
            ELSE
                a_held[s] := a_held[s] - h_amount[hs];
                a_balance[s] := a_balance[s] + h_amount[hs];
                a_dirty[s] := true;
                h_status[hs] := 'released'; h_dirty[hs] := true;
                hc := hc + 1;
                hi_user[hc] := a_user[s]; hi_rid[hc] := p_request_ids[i]; hi_hold[hc] := h_id[hs];
                hi_kind[hc] := 'release'; hi_amount[hc] := h_amount[hs];
                hi_bal[hc] := a_balance[s]; hi_held[hc] := a_held[s]; hi_op[hc] := h_optype[hs];
                hi_meta[hc] := op_meta[i];
                o_status[i] := 'released';
            END IF;
            o_balance[i] := a_balance[s];
            o_held[i] := a_held[s];
        END IF;
    END LOOP;

    -- 6. Write: one UPDATE per touched account, bulk inserts for the rest.
    UPDATE public.credit_accounts c
       SET balance = x.b, held = x.h, lifetime_granted = x.g, lifetime_consumed = x.c,
           updated_at = v_now
      FROM unnest(a_user, a_balance, a_held, a_granted, a_consumed, a_dirty)
           AS x(u, b, h, g, c, d)
     WHERE x.d AND c.user_id = x.u;

    INSERT INTO public.token_consumption_locks
           (hold_id, user_id, amount, operation_type, status, settled_amount, metadata,
            expires_at, created_at, resolved_at)
    SELECT x.id, a_user[x.slot], x.amount, x.optype, x.st, x.settled, x.meta, x.expires, v_now,
           CASE WHEN x.st <> 'held' THEN v_now END
      FROM unnest(h_id, h_slot, h_amount, h_optype, h_status, h_settled, h_meta, h_expires,
                  h_new)
           AS x(id, slot, amount, optype, st, settled, meta, expires, isnew)
     WHERE x.isnew;

    UPDATE public.token_consumption_locks l
       SET status = x.st, settled_amount = x.settled, resolved_at = v_now
      FROM unnest(h_id, h_status, h_settled, h_dirty, h_new) AS x(id, st, settled, d, isnew)
     WHERE x.d AND NOT x.isnew AND l.hold_id = x.id;

    IF hc > 0 THEN
        INSERT INTO public.token_balance_history
               (user_id, request_id, hold_id, kind, amount, balance_after, held_after,
                operation_type, metadata, created_at)
        SELECT x.u, x.rid, x.hid, x.k, x.a, x.b, x.h, x.op, x.m, v_now
          FROM unnest(hi_user, hi_rid, hi_hold, hi_kind, hi_amount, hi_bal, hi_held, hi_op,
                      hi_meta) WITH ORDINALITY AS x(u, rid, hid, k, a, b, h, op, m, ord)
         ORDER BY x.ord;
    END IF;

    INSERT INTO public.ledger_requests
           (request_id, kind, user_id, hold_id, amount, fingerprint, status, balance_after,
            held_after, reason, created_at)
    SELECT x.rid, x.k, x.u, x.h, x.a, x.fp, x.st, x.b, x.hd, x.r, v_now
      FROM unnest(p_request_ids, p_kinds, o_user, p_hold_ids, p_amounts, op_fp, o_status,
                  o_balance, o_held, o_reason, o_store)
           AS x(rid, k, u, h, a, fp, st, b, hd, r, keep)
     WHERE x.keep;

    RETURN QUERY
    SELECT x.rid, x.st, x.b, x.h, x.r
      FROM unnest(p_request_ids, o_status, o_balance, o_held, o_reason)
           WITH ORDINALITY AS x(rid, st, b, h, r, ord)
     ORDER BY x.ord;
END
$fn$;

-- ---------------------------------------------------------------------------------------------
-- cleanup_expired_locks(): expire every open hold past its expires_at, return its tokens to the
-- balance and write one 'expire' history row per hold (request_id = the hold id). Returns how
-- many holds it expired. Same effect as the expiry tw_ledger_apply performs when a settle or
-- release meets a past-due hold.
-- ---------------------------------------------------------------------------------------------

CREATE FUNCTION public.cleanup_expired_locks()
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $fn$
DECLARE
    v_users uuid[];
    v_count integer;
BEGIN
    SELECT pg_catalog.array_agg(DISTINCT l.user_id ORDER BY l.user_id)
      INTO v_users
      FROM public.token_consumption_locks l
     WHERE l.status = 'held' AND l.expires_at <= pg_catalog.now();
    IF v_users IS NULL THEN
        RETURN 0;
    END IF;

    -- Same lock order as tw_ledger_apply: accounts by user_id.
    PERFORM 1
      FROM (SELECT c.user_id FROM public.credit_accounts c
             WHERE c.user_id = ANY (v_users)
             ORDER BY c.user_id
               FOR UPDATE) locked;

    WITH expired AS (
        UPDATE public.token_consumption_locks l
           SET status = 'expired', resolved_at = pg_catalog.now()
         WHERE l.user_id = ANY (v_users) AND l.status = 'held'
           AND l.expires_at <= pg_catalog.now()
        RETURNING l.hold_id, l.user_id, l.amount, l.operation_type
    ), per_user AS (
        SELECT e.user_id, pg_catalog.sum(e.amount)::bigint AS total
          FROM expired e GROUP BY e.user_id
    ), accounts AS (
        UPDATE public.credit_accounts c
           SET balance = c.balance + p.total, held = c.held - p.total,
               updated_at = pg_catalog.now()
          FROM per_user p
         WHERE c.user_id = p.user_id
        RETURNING c.user_id, c.balance, c.held, p.total
    ), rows AS (
        SELECT e.hold_id, e.user_id, e.amount, e.operation_type,
               (ac.balance - ac.total + pg_catalog.sum(e.amount) OVER w)::bigint AS balance_after,
               (ac.held + ac.total - pg_catalog.sum(e.amount) OVER w)::bigint AS held_after
          FROM expired e JOIN accounts ac ON ac.user_id = e.user_id
        WINDOW w AS (PARTITION BY e.user_id ORDER BY e.hold_id
                     ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)
    )
    INSERT INTO public.token_balance_history
           (user_id, request_id, hold_id, kind, amount, balance_after, held_after,
            operation_type, metadata)
    SELECT r.user_id, r.hold_id, r.hold_id, 'expire', r.amount, r.balance_after, r.held_after,
           r.operation_type, '{}'::jsonb
      FROM rows r
     ORDER BY r.user_id, r.hold_id;

    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END
$fn$;

-- ---------------------------------------------------------------------------------------------
-- The synchronous SQL door. Each function applies ONE operation through tw_ledger_apply and
-- returns a jsonb:
--   {"success": bool, "status": text, "request_id": uuid, "balance": int|null,
--    "held": int|null, "error": text|null (= status when success is false),
--    "reason": text|null}  (+ "hold_id" for hold_tokens)
-- Metadata limit 4096 bytes and max hold TTL 86400 s: the defaults of ledger.metadata_max_bytes
-- and ledger.max_hold_ttl_secs.
-- A concurrent first use of the same request id for different accounts can make the
-- outcome insert collide (unique_violation); the door then re-runs the operation, which
-- finds the stored outcome.
-- ---------------------------------------------------------------------------------------------

CREATE FUNCTION public.tw_ledger_apply_one(
    p_request_id uuid, p_kind text, p_user_id uuid, p_amount bigint, p_label text,
    p_hold_id uuid, p_ttl_secs integer, p_metadata jsonb
)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $fn$
DECLARE
    r record;
    attempt integer;
BEGIN
    FOR attempt IN 1 .. 3 LOOP
        BEGIN
            SELECT * INTO r
              FROM public.tw_ledger_apply(
                  ARRAY[p_request_id], ARRAY[p_kind], ARRAY[p_user_id], ARRAY[p_amount],
                  ARRAY[p_label], ARRAY[p_hold_id], ARRAY[p_ttl_secs], ARRAY[p_metadata],
                  4096, 86400);
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

CREATE FUNCTION public.consume_tokens_atomic(
    p_request_id uuid, p_user_id uuid, p_token_amount bigint, p_operation_type text,
    p_metadata jsonb DEFAULT '{}'::jsonb
)
RETURNS jsonb
LANGUAGE sql
SECURITY DEFINER
SET search_path = ''
AS $fn$
    SELECT public.tw_ledger_apply_one(p_request_id, 'consume', p_user_id, p_token_amount,
                                      p_operation_type, NULL, NULL, p_metadata);
$fn$;

CREATE FUNCTION public.add_tokens(
    p_user_id uuid, p_amount bigint, p_reason text, p_metadata jsonb DEFAULT '{}'::jsonb,
    p_request_id uuid DEFAULT NULL
)
RETURNS jsonb
LANGUAGE sql
SECURITY DEFINER
SET search_path = ''
AS $fn$
    SELECT public.tw_ledger_apply_one(coalesce(p_request_id, pg_catalog.gen_random_uuid()),
                                      'grant', p_user_id, p_amount, p_reason, NULL, NULL,
                                      p_metadata);
$fn$;

CREATE FUNCTION public.hold_tokens(
    p_request_id uuid, p_user_id uuid, p_amount bigint, p_operation_type text,
    p_ttl_secs integer DEFAULT 600, p_metadata jsonb DEFAULT '{}'::jsonb
)
RETURNS jsonb
LANGUAGE sql
SECURITY DEFINER
SET search_path = ''
AS $fn$
    SELECT public.tw_ledger_apply_one(p_request_id, 'hold', p_user_id, p_amount,
                                      p_operation_type, NULL, p_ttl_secs, p_metadata)
           || pg_catalog.jsonb_build_object('hold_id', p_request_id);
$fn$;

CREATE FUNCTION public.settle_hold(
    p_request_id uuid, p_hold_id uuid, p_amount bigint, p_metadata jsonb DEFAULT '{}'::jsonb
)
RETURNS jsonb
LANGUAGE sql
SECURITY DEFINER
SET search_path = ''
AS $fn$
    SELECT public.tw_ledger_apply_one(p_request_id, 'settle', NULL, p_amount, NULL, p_hold_id,
                                      NULL, p_metadata);
$fn$;

CREATE FUNCTION public.release_hold(
    p_request_id uuid, p_hold_id uuid, p_metadata jsonb DEFAULT '{}'::jsonb
)
RETURNS jsonb
LANGUAGE sql
SECURITY DEFINER
SET search_path = ''
AS $fn$
    SELECT public.tw_ledger_apply_one(p_request_id, 'release', NULL, NULL, NULL, p_hold_id,
                                      NULL, p_metadata);
$fn$;

-- Only the service role (and the owner, i.e. the worker) may call the ledger functions: they
-- act on any account. Supabase's default privileges grant EXECUTE to anon/authenticated, so
-- revoke from them explicitly too.
REVOKE ALL ON FUNCTION
    public.tw_ledger_apply(uuid[], text[], uuid[], bigint[], text[], uuid[], integer[], jsonb[], integer, integer),
    public.tw_ledger_apply_one(uuid, text, uuid, bigint, text, uuid, integer, jsonb),
    public.cleanup_expired_locks(),
    public.consume_tokens_atomic(uuid, uuid, bigint, text, jsonb),
    public.add_tokens(uuid, bigint, text, jsonb, uuid),
    public.hold_tokens(uuid, uuid, bigint, text, integer, jsonb),
    public.settle_hold(uuid, uuid, bigint, jsonb),
    public.release_hold(uuid, uuid, jsonb)
FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION
    public.tw_ledger_apply(uuid[], text[], uuid[], bigint[], text[], uuid[], integer[], jsonb[], integer, integer),
    public.tw_ledger_apply_one(uuid, text, uuid, bigint, text, uuid, integer, jsonb),
    public.cleanup_expired_locks(),
    public.consume_tokens_atomic(uuid, uuid, bigint, text, jsonb),
    public.add_tokens(uuid, bigint, text, jsonb, uuid),
    public.hold_tokens(uuid, uuid, bigint, text, integer, jsonb),
    public.settle_hold(uuid, uuid, bigint, jsonb),
    public.release_hold(uuid, uuid, jsonb)
TO service_role;

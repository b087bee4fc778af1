-- Credits ledger: accounts, durable request outcomes, append-only history, holds, anomalies,
-- and the SQL functions that apply ledger operations.
--
-- The rules live in ONE function, public.tw_ledger_apply_core (a batch of operations), entered
-- through public.tw_ledger_apply. The queue path
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
-- including failures (insufficient_tokens, rejected, ...). kind, user_id (consume/grant/hold),
-- hold_id, amount, label (operation_type or reason), ttl_secs and metadata are the caller's
-- fields; a repeat with any field different is a request_id_conflict. No index on user_id: it
-- would slow the hot insert path; users read their history table, which has one.
CREATE TABLE public.ledger_requests (
    request_id    uuid PRIMARY KEY,
    kind          text NOT NULL CHECK (kind IN ('consume', 'grant', 'hold', 'settle', 'release')),
    user_id       uuid NULL,
    hold_id       uuid NULL,
    amount        bigint NULL,
    label         text NULL,
    ttl_secs      integer NULL,
    metadata      jsonb NULL,
    status        text NOT NULL CHECK (status IN (
        'consumed', 'granted', 'held', 'settled', 'released', 'insufficient_tokens',
        'hold_expired', 'hold_not_found', 'hold_already_resolved', 'rate_limited', 'rejected')),
    balance_after bigint NULL,
    held_after    bigint NULL,
    reason        text NULL,
    created_at    timestamptz NOT NULL DEFAULT pg_catalog.now()
);

-- See token_balance_history_created_brin below.
CREATE INDEX ledger_requests_created_brin ON public.ledger_requests USING brin (created_at);

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
-- Ascending: new rows land at the end of their user's range, where B-tree splits stay dense
-- (newest-first reads scan it backwards just as fast).
CREATE INDEX token_balance_history_user_idx ON public.token_balance_history (user_id, id);
-- Anomaly detection and detect_high_frequency_requests read recent rows by created_at. Both
-- tables are append-only, so created_at follows the physical order and a BRIN index (a few
-- pages, nearly free to maintain on the insert path) narrows those reads to the recent blocks.
CREATE INDEX token_balance_history_created_brin
    ON public.token_balance_history USING brin (created_at);

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
-- tw_ledger_apply_core: the one implementation of the ledger rules, reached only through
-- tw_ledger_apply (defined below), which both doors call.
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

CREATE FUNCTION public.tw_ledger_apply_core(
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
-- Every table access here is by key: a sequential scan of accounts (live and dead versions) per
-- batch costs more than the batch's index probes once the table has a few thousand rows.
SET enable_seqscan = off
AS $fn$
#variable_conflict use_column
DECLARE
    n integer := coalesce(pg_catalog.array_length(p_request_ids, 1), 0);
    v_now timestamptz := pg_catalog.now();
    c_max constant bigint := 9223372036854775807;
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
    v_has_grant := 'grant' = ANY (p_kinds);
    v_has_holds := 'hold' = ANY (p_kinds) OR 'settle' = ANY (p_kinds)
                   OR 'release' = ANY (p_kinds);

    -- 1. Accounts: create the ones grants need, then lock every touched account in user_id
    --    order (one statement) and read its state. Settle/release touch the account of their
    --    hold (a hold's user never changes, so it can be read before locking).
    IF v_has_grant THEN
        INSERT INTO public.credit_accounts (user_id)
        SELECT DISTINCT x.u
          FROM unnest(p_kinds, p_user_ids, p_amounts) AS x(k, u, a)
         WHERE x.k = 'grant' AND x.u IS NOT NULL AND x.a > 0
         ORDER BY x.u
        ON CONFLICT (user_id) DO NOTHING;
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
    SELECT pg_catalog.array_agg(q.ord), pg_catalog.array_agg(q.m),
           pg_catalog.array_agg(q.first_ord), pg_catalog.array_agg(q.rej),
           pg_catalog.array_agg(q.aslot), pg_catalog.array_agg(q.hslot),
           pg_catalog.array_agg(q.status), pg_catalog.array_agg(q.same),
           pg_catalog.array_agg(q.balance_after), pg_catalog.array_agg(q.held_after),
           pg_catalog.array_agg(q.reason)
      INTO op_ord, op_meta, op_first, op_reject, op_slot, op_hslot, ex_status, ex_same,
           ex_balance, ex_held, ex_reason
      FROM (
        SELECT t.ord::integer AS ord, t.m, t.first_ord::integer AS first_ord,
               CASE
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
                    AND (t.l IS NULL OR pg_catalog.char_length(t.l) NOT BETWEEN 1 AND 100)
                   THEN 'operation_type must be 1 to 100 characters'
               WHEN t.k = 'grant'
                    AND (t.l IS NULL OR pg_catalog.char_length(t.l) NOT BETWEEN 1 AND 200)
                   THEN 'reason must be 1 to 200 characters'
               WHEN pg_catalog.jsonb_typeof(t.m) <> 'object'
                   THEN 'metadata must be a JSON object'
               WHEN pg_catalog.octet_length(t.m::text) > p_metadata_max_bytes
                   THEN pg_catalog.format(
                       'metadata is %s bytes, more than the limit of %s bytes',
                       pg_catalog.octet_length(t.m::text), p_metadata_max_bytes)
               WHEN t.k = 'hold' AND (t.ttl IS NULL OR t.ttl < 1 OR t.ttl > p_max_ttl_secs)
                   THEN pg_catalog.format('ttl_secs must be between 1 and %s', p_max_ttl_secs)
               END AS rej,
               au.slot::integer AS aslot,
               hx.slot::integer AS hslot,
               r.status,
               (t.k, CASE WHEN t.k IN ('consume', 'grant', 'hold') THEN t.u END,
                t.h, t.a, t.l, t.ttl, t.m)
               IS NOT DISTINCT FROM
               (r.kind, CASE WHEN r.kind IN ('consume', 'grant', 'hold') THEN r.user_id END,
                r.hold_id, r.amount, r.label, r.ttl_secs, r.metadata) AS same,
               r.balance_after, r.held_after, r.reason
          FROM (
            SELECT y.*, pg_catalog.min(y.ord) OVER (PARTITION BY y.rid) AS first_ord
              FROM (
                SELECT x.ord, x.rid, x.k, x.u, x.h, x.a, x.l, x.ttl,
                       CASE WHEN x.m IS NULL OR pg_catalog.jsonb_typeof(x.m) = 'null'
                            THEN '{}'::jsonb ELSE x.m END AS m
                  FROM unnest(p_request_ids, p_kinds, p_user_ids, p_hold_ids, p_amounts,
                              p_labels, p_ttl_secs, p_metadata)
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
                   r.status, r.balance_after, r.held_after, r.reason
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
            IF p_kinds[i] = p_kinds[f]
               AND (p_kinds[i] NOT IN ('consume', 'grant', 'hold')
                    OR p_user_ids[i] IS NOT DISTINCT FROM p_user_ids[f])
               AND p_hold_ids[i] IS NOT DISTINCT FROM p_hold_ids[f]
               AND p_amounts[i] IS NOT DISTINCT FROM p_amounts[f]
               AND p_labels[i] IS NOT DISTINCT FROM p_labels[f]
               AND p_ttl_secs[i] IS NOT DISTINCT FROM p_ttl_secs[f]
               AND op_meta[i] = op_meta[f] THEN
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
            IF NOT a_found[s] THEN
                -- Step 1 inserted (or waited for a concurrent insert of) this account before
                -- the lock query, so it must have been seen; if not, retry the whole batch
                -- rather than lose the grant.
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
           (request_id, kind, user_id, hold_id, amount, label, ttl_secs, metadata, status,
            balance_after, held_after, reason, created_at)
    SELECT d.rid, d.k, d.usr, d.h, d.a, d.l, d.ttl, d.m, d.st, d.b, d.hd, d.r, v_now
      FROM decided d;

    RETURN QUERY
    SELECT x.rid, x.st, x.b, x.h, x.r
      FROM unnest(p_request_ids, o_status, o_balance, o_held, o_reason)
           WITH ORDINALITY AS x(rid, st, b, h, r, ord)
     ORDER BY x.ord;
END
$fn$;

-- The entry point of both doors. Same rules (it IS tw_ledger_apply_core), planned for the
-- batch at hand: for a large batch a cached generic plan guesses a few elements per array and
-- may pick nested loops that are quadratic in the batch size, so large batches get a custom
-- plan per statement; small ones (the SQL door, a quiet queue) reuse cached generic plans and
-- skip the planning. The SET clause keeps the choice local to this call.
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
-- The synchronous SQL door. Each function applies ONE operation through tw_ledger_apply (the
-- same entry point as the queue path) and returns a jsonb:
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
    public.tw_ledger_apply_core(uuid[], text[], uuid[], bigint[], text[], uuid[], integer[], jsonb[], integer, integer),
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

-- Variants of a one-debit SQL door, for scripts/bench-ledger-door-variants.sh (issue 12): what a
-- debit costs with each piece of work, on tokenwarden's own tables, beside the seed's function.
-- Needs schema `seed` (src/bin/bench_ledger_seed.sql) first. Experiments only, in schema
-- `variants` of a throw-away database: nothing here is a door of tokenwarden, and each variant
-- handles only the path the benchmark drives (a valid, first-seen consume with enough balance);
-- any other case raises, so pgbench counts a failure instead of a fast transaction.
--   floor       one guarded UPDATE of the account and the commit: no outcome, no history. No
--               one-debit door with a durable record can be cheaper.
--   seed_shape  the seed's five statements (look up the request id, SELECT ... FOR UPDATE, UPDATE,
--               two INSERTs) on tokenwarden's tables, without tokenwarden's rules.
--   flat        tokenwarden's rules in three statements in one function: the bounds, the stored
--               outcome and the blocking anomaly read unlocked in one statement with
--               ledger_rules.rejection; one UPDATE guarded by ledger_rules.decision; one
--               statement inserting the outcome and the history row (ON CONFLICT), and
--               ledger_rules.answer. What the door's success path would cost without the
--               general function's second level, its unlocked read of the account and its
--               refusal and race branches.
CREATE SCHEMA variants;

CREATE FUNCTION variants.floor(
    p_request_id uuid, p_user_id uuid, p_token_amount bigint, p_operation_type text,
    p_metadata jsonb DEFAULT '{}'::jsonb
)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_balance bigint;
BEGIN
    UPDATE public.credit_accounts c
       SET balance = c.balance - p_token_amount
     WHERE c.user_id = p_user_id AND c.balance >= p_token_amount
    RETURNING c.balance INTO v_balance;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'variant left the measured path';
    END IF;
    RETURN pg_catalog.jsonb_build_object('success', true, 'balance', v_balance);
END
$fn$;

CREATE FUNCTION variants.seed_shape(
    p_request_id uuid, p_user_id uuid, p_token_amount bigint, p_operation_type text,
    p_metadata jsonb DEFAULT '{}'::jsonb
)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_balance bigint;
    v_held bigint;
    v_existing text;
BEGIN
    SELECT l.status INTO v_existing
      FROM public.ledger_requests l
     WHERE l.request_id = p_request_id;
    IF FOUND THEN
        RAISE EXCEPTION 'variant left the measured path';
    END IF;
    SELECT c.balance, c.held INTO v_balance, v_held
      FROM public.credit_accounts c
     WHERE c.user_id = p_user_id
       FOR UPDATE;
    IF NOT FOUND OR v_balance < p_token_amount THEN
        RAISE EXCEPTION 'variant left the measured path';
    END IF;
    UPDATE public.credit_accounts c
       SET balance = c.balance - p_token_amount,
           lifetime_consumed = c.lifetime_consumed + p_token_amount, updated_at = pg_catalog.now()
     WHERE c.user_id = p_user_id;
    INSERT INTO public.token_balance_history
           (user_id, request_id, kind, amount, balance_after, held_after, operation_type, metadata)
    VALUES (p_user_id, p_request_id, 'consume', p_token_amount, v_balance - p_token_amount,
            v_held, p_operation_type, p_metadata);
    INSERT INTO public.ledger_requests
           (request_id, kind, user_id, amount, label, metadata, status, balance_after, held_after)
    VALUES (p_request_id, 'consume', p_user_id, p_token_amount, p_operation_type, p_metadata,
            'consumed', v_balance - p_token_amount, v_held);
    RETURN pg_catalog.jsonb_build_object('success', true, 'status', 'consumed',
                                         'balance', v_balance - p_token_amount);
END
$fn$;

CREATE FUNCTION variants.flat(
    p_request_id uuid, p_user_id uuid, p_token_amount bigint, p_operation_type text,
    p_metadata jsonb DEFAULT '{}'::jsonb
)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v record;
    v_balance bigint;
    v_held bigint;
    v_now timestamptz := pg_catalog.now();
    v_meta jsonb := ledger_rules.metadata(p_metadata);
BEGIN
    SELECT ledger_rules.rejection('consume', p_user_id, NULL, p_token_amount, p_operation_type,
                                  NULL, v_meta, st.operation_type_max_chars,
                                  st.reason_max_chars, st.metadata_max_bytes,
                                  st.max_hold_ttl_secs) AS rejection,
           r.status AS ex_status,
           EXISTS (SELECT 1 FROM public.token_anomalies an
                    WHERE an.user_id = p_user_id AND an.severity = 'block'
                      AND an.resolved_at IS NULL) AS blocked
      INTO v
      FROM public.tw_ledger_settings st
      LEFT JOIN public.ledger_requests r ON r.request_id = p_request_id
     WHERE st.id = 1;
    IF v.ex_status IS NOT NULL OR v.rejection IS NOT NULL OR v.blocked THEN
        RAISE EXCEPTION 'variant left the measured path';
    END IF;
    UPDATE public.credit_accounts c
       SET balance = c.balance - p_token_amount,
           lifetime_consumed = c.lifetime_consumed + p_token_amount, updated_at = v_now
     WHERE c.user_id = p_user_id
       AND ledger_rules.decision('consume', p_token_amount, false, c.balance,
                                 c.lifetime_granted) = 'consumed'
    RETURNING c.balance, c.held INTO v_balance, v_held;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'variant left the measured path';
    END IF;
    WITH outcome AS (
        INSERT INTO public.ledger_requests AS l
               (request_id, kind, user_id, amount, label, metadata, status, balance_after,
                held_after, created_at)
        VALUES (p_request_id, 'consume', p_user_id, p_token_amount, p_operation_type, v_meta,
                'consumed', v_balance, v_held, v_now)
        ON CONFLICT (request_id) DO NOTHING
        RETURNING l.request_id
    )
    INSERT INTO public.token_balance_history
           (user_id, request_id, kind, amount, balance_after, held_after, operation_type,
            metadata, created_at)
    SELECT p_user_id, o.request_id, 'consume', p_token_amount, v_balance, v_held,
           p_operation_type, v_meta, v_now
      FROM outcome o;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'variant left the measured path';
    END IF;
    RETURN ledger_rules.answer(p_request_id, 'consumed', v_balance, v_held, NULL);
END
$fn$;

-- The benchmark's users: the same ids funded in the seed's table and in tokenwarden's.
CREATE TABLE variants.users (i integer PRIMARY KEY, id uuid NOT NULL);
INSERT INTO variants.users SELECT i, pg_catalog.gen_random_uuid() FROM generate_series(1, 10000) i;
INSERT INTO seed.user_tokens (user_id, balance) SELECT id, 1000000000000 FROM variants.users;
INSERT INTO public.credit_accounts (user_id, balance, lifetime_granted)
SELECT id, 1000000000000, 1000000000000 FROM variants.users;

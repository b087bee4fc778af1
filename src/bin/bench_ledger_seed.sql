-- The seed's design as written, the benchmark's baseline: consume_tokens_atomic as the first
-- seed (migration 20251022180000_deploy_atomic_token_system_complete) and
-- ../shared/reference/credits-ledger.md describe it. PL/pgSQL: look up the request id, lock the
-- account row (SELECT ... FOR UPDATE), check the balance, update it, then two inserts (the
-- history row and the request log). Created by `bench_ledger` in schema `seed` of its own
-- benchmark database; nothing of tokenwarden's is used.
CREATE SCHEMA seed;

CREATE TABLE seed.user_tokens (
    user_id    uuid PRIMARY KEY,
    balance    bigint NOT NULL DEFAULT 0 CHECK (balance >= 0),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- The request log (the seed's token_consumption_locks): one row per request id.
CREATE TABLE seed.token_consumption_locks (
    request_id     uuid PRIMARY KEY,
    user_id        uuid NOT NULL,
    amount         bigint NOT NULL,
    operation_type text NOT NULL,
    status         text NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE seed.token_balance_history (
    id             bigserial PRIMARY KEY,
    user_id        uuid NOT NULL,
    request_id     uuid NOT NULL,
    amount         bigint NOT NULL,
    balance_after  bigint NOT NULL,
    operation_type text NOT NULL,
    metadata       jsonb NOT NULL DEFAULT '{}',
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ON seed.token_balance_history (user_id, created_at);

CREATE FUNCTION seed.consume_tokens_atomic(
    p_request_id uuid, p_user_id uuid, p_token_amount bigint, p_operation_type text,
    p_metadata jsonb DEFAULT '{}'::jsonb
)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_balance bigint;
    v_existing text;
BEGIN
    SELECT l.status INTO v_existing
      FROM seed.token_consumption_locks l
     WHERE l.request_id = p_request_id;
    IF FOUND THEN
        RETURN jsonb_build_object('success', v_existing = 'consumed', 'status', v_existing,
                                  'duplicate', true);
    END IF;
    SELECT t.balance INTO v_balance
      FROM seed.user_tokens t
     WHERE t.user_id = p_user_id
       FOR UPDATE;
    IF NOT FOUND OR v_balance < p_token_amount THEN
        RETURN jsonb_build_object('success', false, 'status', 'insufficient_tokens',
                                  'balance', coalesce(v_balance, 0));
    END IF;
    UPDATE seed.user_tokens
       SET balance = balance - p_token_amount, updated_at = now()
     WHERE user_id = p_user_id;
    INSERT INTO seed.token_balance_history
           (user_id, request_id, amount, balance_after, operation_type, metadata)
    VALUES (p_user_id, p_request_id, -p_token_amount, v_balance - p_token_amount,
            p_operation_type, p_metadata);
    INSERT INTO seed.token_consumption_locks
           (request_id, user_id, amount, operation_type, status)
    VALUES (p_request_id, p_user_id, p_token_amount, p_operation_type, 'consumed');
    RETURN jsonb_build_object('success', true, 'status', 'consumed',
                              'balance', v_balance - p_token_amount);
END
$$;

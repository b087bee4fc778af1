-- Proven wallets (Sign-In with Ethereum, EIP-4361): a wallet counts for a user's access checks
-- only after the user signed a SIWE message carrying a nonce tokenwarden issued to them.
--
--   * public.tw_access_settings: one row, the SIWE bounds the nonce door enforces, written by
--     the worker from [access] at start (like tw_ledger_settings).
--   * public.access_siwe_nonces: issued nonces. Single use (used_at, used_by_request), short
--     expiry (expires_at). Internal: nobody but the owner reads or writes it.
--   * public.user_wallets: the links. A user reads their own rows (RLS); only the worker writes.
--     A wallet belongs to at most one user: a newer proof by another user moves it (whoever
--     signs with the key now controls the wallet now).
--   * public.access_wallet_nonce(): the door for a signed-in user (`authenticated`): a fresh
--     nonce for auth.uid(). public.tw_access_issue_nonce(uuid) is the one statement of the
--     nonce rules; the worker and the CLI call it directly as the owner.
-- Every function runs with `search_path = pg_catalog, pg_temp` and names objects with their schema.

CREATE TABLE public.tw_access_settings (
    id                  integer PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    -- lifetime of a nonce, seconds (access.siwe_nonce_ttl_secs)
    nonce_ttl_secs      integer NOT NULL DEFAULT 300 CHECK (nonce_ttl_secs >= 1),
    -- unused, unexpired nonces one user may hold at once (access.siwe_max_open_nonces)
    max_open_nonces     integer NOT NULL DEFAULT 10 CHECK (max_open_nonces >= 1),
    updated_at          timestamptz NOT NULL DEFAULT pg_catalog.now()
);
INSERT INTO public.tw_access_settings (id) VALUES (1);
ALTER TABLE public.tw_access_settings ENABLE ROW LEVEL SECURITY;

CREATE TABLE public.access_siwe_nonces (
    -- 32 lowercase hex characters: alphanumeric and longer than EIP-4361's minimum of 8
    nonce            text PRIMARY KEY CHECK (nonce ~ '^[0-9a-f]{32}$'),
    user_id          uuid NOT NULL,
    issued_at        timestamptz NOT NULL DEFAULT pg_catalog.now(),
    expires_at       timestamptz NOT NULL,
    used_at          timestamptz,
    -- the link_wallet request that used it: a redelivered request answers with its link again
    used_by_request  uuid,
    CHECK ((used_at IS NULL) = (used_by_request IS NULL))
);
CREATE INDEX access_siwe_nonces_user ON public.access_siwe_nonces (user_id, expires_at);
ALTER TABLE public.access_siwe_nonces ENABLE ROW LEVEL SECURITY;

CREATE TABLE public.user_wallets (
    user_id      uuid NOT NULL,
    address      text NOT NULL CHECK (address ~ '^0x[0-9a-f]{40}$'),
    -- chains the wallet was proven on (the SIWE messages' Chain IDs). An EOA's key controls
    -- the address on every chain; a contract wallet (erc1271) counts only on these chains.
    chains       bigint[] NOT NULL CHECK (pg_catalog.cardinality(chains) >= 1),
    -- how the signature was verified: 'eoa' (signer recovered) or 'erc1271' (isValidSignature)
    method       text NOT NULL CHECK (method IN ('eoa', 'erc1271')),
    verified_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (user_id, address),
    UNIQUE (address)
);
ALTER TABLE public.user_wallets ENABLE ROW LEVEL SECURITY;
CREATE POLICY user_wallets_own ON public.user_wallets
    FOR SELECT TO authenticated
    USING ((select auth.uid()) = user_id);

-- A fresh nonce for p_user: refuses a NULL user and a user already holding max_open_nonces
-- unused live nonces (SQLSTATE 54000), and forgets that user's expired nonces on the way.
CREATE FUNCTION public.tw_access_issue_nonce(p_user uuid)
RETURNS TABLE (nonce text, expires_at timestamptz)
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_settings record;
    v_open     bigint;
BEGIN
    IF p_user IS NULL THEN
        RAISE EXCEPTION 'a nonce needs a user (not signed in?)' USING ERRCODE = '28000';
    END IF;
    SELECT s.nonce_ttl_secs, s.max_open_nonces INTO v_settings
    FROM public.tw_access_settings s WHERE s.id = 1;
    -- Serialises the issues of one user, so the open-nonce bound holds under concurrency.
    PERFORM pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtextextended('tw_access_nonce:' || p_user::text, 0));
    DELETE FROM public.access_siwe_nonces n
    WHERE n.user_id = p_user AND n.expires_at < pg_catalog.now();
    SELECT pg_catalog.count(*) INTO v_open FROM public.access_siwe_nonces n
    WHERE n.user_id = p_user AND n.used_at IS NULL;
    IF v_open >= v_settings.max_open_nonces THEN
        RAISE EXCEPTION 'user % already holds % unused nonces; use or let one expire', p_user, v_open
            USING ERRCODE = '54000';
    END IF;
    RETURN QUERY
    INSERT INTO public.access_siwe_nonces AS n (nonce, user_id, expires_at)
    VALUES (pg_catalog.replace(pg_catalog.gen_random_uuid()::text, '-', ''), p_user,
            pg_catalog.now() + pg_catalog.make_interval(secs => v_settings.nonce_ttl_secs))
    RETURNING n.nonce, n.expires_at;
END
$$;

-- The signed-in user's door: supabase.rpc('access_wallet_nonce') → {nonce, expires_at}.
CREATE FUNCTION public.access_wallet_nonce()
RETURNS TABLE (nonce text, expires_at timestamptz)
LANGUAGE sql VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT i.nonce, i.expires_at FROM public.tw_access_issue_nonce(auth.uid()) i;
$$;

-- Access rules and checks: the rules (per creator and feature, a condition tree over holdings),
-- their change log, and the one evaluation every door uses (SQL for users and services, the
-- worker's queue door, the CLI): tw_access_evaluate.
--
--   * public.access_rules: one rule per (creator_id, feature); `rule` is the validated JSON
--     ({condition, per_wallet, stale_policy}); `version` counts its changes.
--   * public.access_rule_changes: every set/replace/delete (who, when, old, new); each change
--     also NOTIFYs channel `tw_access_rules`, which the worker relays to Redis
--     (`{prefix}:access_rule_changes`) so every replica drops cached decisions of that rule.
--   * public.tw_access_chain_heads: each chain's head as the worker last saw it, so the SQL
--     evaluation can tell a lagging index (head − checkpoint > access.stale_after_blocks).
--   * tw_access_settings gains stale_after_blocks.
-- A condition is a tree: {"all": [...]}, {"any": [...]}, {"at_least": {"k": K, "of": [...]}}, or a
-- leaf on one chain:
--   {"erc20":    {"chain_id": C, "token": "0x…", "min": "100"}}       whole tokens (decimals)
--   {"erc721":   {"chain_id": C, "token": "0x…", "min_count": N}}     NFTs owned
--   {"erc721":   {"chain_id": C, "token": "0x…", "token_id": "42"}}   owns that id
--   {"snapshot": {"snapshot_id": "uuid", "min": "10"}}                whole tokens in a snapshot
--   {"held":     {"chain_id": C, "token": "0x…", "min": "5", "since_block": B | "for_secs": S}}
--                (validated, refused until the balance-history reads land: "not available yet")
-- Every function runs with `search_path = pg_catalog, pg_temp` and names objects with their schema.

ALTER TABLE public.tw_access_settings
    -- a chain whose checkpoint is more than this many blocks behind its head is stale
    ADD COLUMN stale_after_blocks bigint NOT NULL DEFAULT 100 CHECK (stale_after_blocks >= 0);

CREATE TABLE public.tw_access_chain_heads (
    chain_id     bigint PRIMARY KEY,
    head         bigint NOT NULL,
    observed_at  timestamptz NOT NULL DEFAULT pg_catalog.now()
);
ALTER TABLE public.tw_access_chain_heads ENABLE ROW LEVEL SECURITY;

CREATE TABLE public.access_rules (
    creator_id   text NOT NULL CHECK (pg_catalog.length(creator_id) BETWEEN 1 AND 200),
    feature      text NOT NULL CHECK (pg_catalog.length(feature) BETWEEN 1 AND 100),
    rule         jsonb NOT NULL,
    version      integer NOT NULL DEFAULT 1,
    updated_by   text NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (creator_id, feature)
);
ALTER TABLE public.access_rules ENABLE ROW LEVEL SECURITY;

CREATE TABLE public.access_rule_changes (
    id           bigserial PRIMARY KEY,
    creator_id   text NOT NULL,
    feature      text NOT NULL,
    old_rule     jsonb,
    new_rule     jsonb,
    old_version  integer,
    new_version  integer,
    changed_by   text NOT NULL,
    changed_at   timestamptz NOT NULL DEFAULT pg_catalog.now()
);
CREATE INDEX access_rule_changes_rule ON public.access_rule_changes (creator_id, feature, id);
ALTER TABLE public.access_rule_changes ENABLE ROW LEVEL SECURITY;

-- NULL when `node` (at JSON path `path`) is a valid condition, else "<path>: <what is wrong>".
CREATE FUNCTION public.tw_access_check_node(node jsonb, path text)
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_kind    text;
    v_body    jsonb;
    v_items   jsonb;
    v_err     text;
    v_i       integer;
    v_k       numeric;
    v_token   record;
    v_snap    record;
    v_chain   bigint;
    v_key     text;
    v_allowed text[];
BEGIN
    IF pg_catalog.jsonb_typeof(node) IS DISTINCT FROM 'object' THEN
        RETURN path || ': a condition must be an object';
    END IF;
    IF (SELECT pg_catalog.count(*) FROM pg_catalog.jsonb_object_keys(node)) <> 1 THEN
        RETURN path || ': a condition has exactly one key (all, any, at_least, erc20, erc721, snapshot, held)';
    END IF;
    SELECT k INTO v_kind FROM pg_catalog.jsonb_object_keys(node) k;
    v_body := node -> v_kind;
    path := path || '.' || v_kind;
    IF v_kind IN ('all', 'any', 'at_least') THEN
        IF v_kind = 'at_least' THEN
            IF pg_catalog.jsonb_typeof(v_body) IS DISTINCT FROM 'object' THEN
                RETURN path || ': must be {"k": K, "of": [...]}';
            END IF;
            FOR v_key IN SELECT pg_catalog.jsonb_object_keys(v_body) LOOP
                IF v_key NOT IN ('k', 'of') THEN
                    RETURN path || '.' || v_key || ': unknown key';
                END IF;
            END LOOP;
            IF pg_catalog.jsonb_typeof(v_body -> 'k') IS DISTINCT FROM 'number' THEN
                RETURN path || '.k: must be a positive integer';
            END IF;
            v_k := (v_body ->> 'k')::numeric;
            v_items := v_body -> 'of';
            path := path || '.of';
        ELSE
            v_items := v_body;
        END IF;
        IF pg_catalog.jsonb_typeof(v_items) IS DISTINCT FROM 'array'
           OR pg_catalog.jsonb_array_length(v_items) = 0 THEN
            RETURN path || ': must be a non-empty array of conditions';
        END IF;
        IF v_kind = 'at_least' AND (v_k <> pg_catalog.trunc(v_k) OR v_k < 1
                                    OR v_k > pg_catalog.jsonb_array_length(v_items)) THEN
            RETURN pg_catalog.replace(path, '.of', '.k') || ': must be an integer from 1 to the number of conditions ('
                || pg_catalog.jsonb_array_length(v_items) || ')';
        END IF;
        FOR v_i IN 0 .. pg_catalog.jsonb_array_length(v_items) - 1 LOOP
            v_err := public.tw_access_check_node(v_items -> v_i, path || '[' || v_i || ']');
            IF v_err IS NOT NULL THEN
                RETURN v_err;
            END IF;
        END LOOP;
        RETURN NULL;
    END IF;
    IF v_kind NOT IN ('erc20', 'erc721', 'snapshot', 'held') THEN
        RETURN path || ': unknown condition (all, any, at_least, erc20, erc721, snapshot, held)';
    END IF;
    IF pg_catalog.jsonb_typeof(v_body) IS DISTINCT FROM 'object' THEN
        RETURN path || ': must be an object';
    END IF;
    v_allowed := CASE v_kind
        WHEN 'erc20' THEN ARRAY['chain_id', 'token', 'min']
        WHEN 'erc721' THEN ARRAY['chain_id', 'token', 'min_count', 'token_id']
        WHEN 'snapshot' THEN ARRAY['snapshot_id', 'min']
        ELSE ARRAY['chain_id', 'token', 'min', 'since_block', 'for_secs'] END;
    FOR v_key IN SELECT pg_catalog.jsonb_object_keys(v_body) LOOP
        IF NOT v_key = ANY (v_allowed) THEN
            RETURN path || '.' || v_key || ': unknown key (expected ' || pg_catalog.array_to_string(v_allowed, ', ') || ')';
        END IF;
    END LOOP;
    IF v_kind = 'snapshot' THEN
        IF (v_body ->> 'snapshot_id') !~ '^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$'
           OR v_body ->> 'snapshot_id' IS NULL THEN
            RETURN path || '.snapshot_id: must be a snapshot id (uuid)';
        END IF;
        SELECT s.status, s.decimals INTO v_snap FROM public.snapshots s
        WHERE s.id = (v_body ->> 'snapshot_id')::uuid;
        IF NOT FOUND THEN
            RETURN path || '.snapshot_id: snapshot ' || (v_body ->> 'snapshot_id') || ' does not exist';
        END IF;
        IF v_snap.status <> 'complete' THEN
            RETURN path || '.snapshot_id: snapshot ' || (v_body ->> 'snapshot_id') || ' is ' || v_snap.status || ', not complete';
        END IF;
        RETURN public.tw_access_check_amount(v_body -> 'min', v_snap.decimals, path || '.min');
    END IF;
    -- Leaves on the live index: a chain and a token the indexer follows, of the right standard.
    IF pg_catalog.jsonb_typeof(v_body -> 'chain_id') IS DISTINCT FROM 'number' THEN
        RETURN path || '.chain_id: must be a chain id (integer)';
    END IF;
    v_chain := (v_body ->> 'chain_id')::numeric::bigint;
    IF NOT EXISTS (SELECT FROM public.chain_tokens t WHERE t.chain_id = v_chain) THEN
        RETURN path || '.chain_id: chain ' || v_chain || ' is not a chain tokenwarden indexes';
    END IF;
    IF (v_body ->> 'token') IS NULL OR (v_body ->> 'token') !~ '^0x[0-9a-fA-F]{40}$' THEN
        RETURN path || '.token: must be a 0x-prefixed 20-byte hex address';
    END IF;
    SELECT t.standard, t.decimals INTO v_token FROM public.chain_tokens t
    WHERE t.chain_id = v_chain AND t.address = pg_catalog.lower(v_body ->> 'token');
    IF NOT FOUND THEN
        RETURN path || '.token: token ' || pg_catalog.lower(v_body ->> 'token') || ' is not indexed on chain ' || v_chain;
    END IF;
    IF v_kind = 'erc721' THEN
        IF v_token.standard <> 'erc721' THEN
            RETURN path || '.token: token is ' || v_token.standard || ', not erc721';
        END IF;
        IF (v_body ? 'min_count') = (v_body ? 'token_id') THEN
            RETURN path || ': give exactly one of min_count and token_id';
        END IF;
        IF v_body ? 'min_count' THEN
            IF pg_catalog.jsonb_typeof(v_body -> 'min_count') IS DISTINCT FROM 'number'
               OR (v_body ->> 'min_count')::numeric < 1
               OR (v_body ->> 'min_count')::numeric <> pg_catalog.trunc((v_body ->> 'min_count')::numeric) THEN
                RETURN path || '.min_count: must be a positive integer';
            END IF;
        ELSIF pg_catalog.jsonb_typeof(v_body -> 'token_id') IS DISTINCT FROM 'string'
              OR (v_body ->> 'token_id') !~ '^[0-9]{1,78}$' THEN
            RETURN path || '.token_id: must be a token id as a decimal string';
        END IF;
        RETURN NULL;
    END IF;
    IF v_token.standard <> 'erc20' THEN
        RETURN path || '.token: token is ' || v_token.standard || ', not erc20';
    END IF;
    IF v_token.decimals IS NULL THEN
        RETURN path || '.token: the token''s decimals are unknown, so whole tokens cannot be counted';
    END IF;
    v_err := public.tw_access_check_amount(v_body -> 'min', v_token.decimals, path || '.min');
    IF v_err IS NOT NULL OR v_kind = 'erc20' THEN
        RETURN v_err;
    END IF;
    -- held
    IF (v_body ? 'since_block') = (v_body ? 'for_secs') THEN
        RETURN path || ': give exactly one of since_block and for_secs';
    END IF;
    RETURN path || ': held-since conditions are not available yet (they need the balance-history reads)';
END
$$;

-- NULL when `amount` is a positive whole-token amount (a decimal string) for `decimals`.
CREATE FUNCTION public.tw_access_check_amount(amount jsonb, decimals integer, path text)
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF pg_catalog.jsonb_typeof(amount) IS DISTINCT FROM 'string' THEN
        RETURN path || ': must be an amount of whole tokens as a decimal string, e.g. "100" or "0.5"';
    END IF;
    BEGIN
        IF public.tw_whole_to_base_units(amount #>> '{}', decimals) <= 0 THEN
            RETURN path || ': must be greater than zero';
        END IF;
    EXCEPTION WHEN OTHERS THEN
        RETURN path || ': ' || SQLERRM;
    END;
    RETURN NULL;
END
$$;

-- NULL when `rule` is a valid rule ({condition, per_wallet?, stale_policy?}), else the path and reason.
CREATE FUNCTION public.tw_access_check_rule(rule jsonb)
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_key text;
BEGIN
    IF pg_catalog.jsonb_typeof(rule) IS DISTINCT FROM 'object' THEN
        RETURN '$: a rule must be an object {condition, per_wallet?, stale_policy?}';
    END IF;
    FOR v_key IN SELECT pg_catalog.jsonb_object_keys(rule) LOOP
        IF v_key NOT IN ('condition', 'per_wallet', 'stale_policy') THEN
            RETURN '$.' || v_key || ': unknown key (expected condition, per_wallet, stale_policy)';
        END IF;
    END LOOP;
    IF NOT rule ? 'condition' THEN
        RETURN '$.condition: missing';
    END IF;
    IF rule ? 'per_wallet' AND pg_catalog.jsonb_typeof(rule -> 'per_wallet') <> 'boolean' THEN
        RETURN '$.per_wallet: must be true or false';
    END IF;
    IF rule ? 'stale_policy' AND (rule ->> 'stale_policy') NOT IN ('deny', 'evaluate') THEN
        RETURN '$.stale_policy: must be "deny" or "evaluate"';
    END IF;
    RETURN public.tw_access_check_node(rule -> 'condition', '$.condition');
END
$$;

-- Sets or replaces the rule of (creator, feature): validated (SQLSTATE 22023 with the JSON path
-- of the bad node otherwise), stored with defaults filled in, recorded and announced.
-- Returns the new version.
CREATE FUNCTION public.tw_access_set_rule(p_creator text, p_feature text, p_rule jsonb, p_actor text)
RETURNS integer
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_err   text;
    v_rule  jsonb;
    v_old   record;
    v_ver   integer;
BEGIN
    IF p_creator IS NULL OR pg_catalog.length(p_creator) NOT BETWEEN 1 AND 200 THEN
        RAISE EXCEPTION 'creator_id must be 1 to 200 characters' USING ERRCODE = '22023';
    END IF;
    IF p_feature IS NULL OR pg_catalog.length(p_feature) NOT BETWEEN 1 AND 100 THEN
        RAISE EXCEPTION 'feature must be 1 to 100 characters' USING ERRCODE = '22023';
    END IF;
    IF p_actor IS NULL OR pg_catalog.length(p_actor) NOT BETWEEN 1 AND 200 THEN
        RAISE EXCEPTION 'actor must be 1 to 200 characters (who changes the rule)' USING ERRCODE = '22023';
    END IF;
    v_err := public.tw_access_check_rule(p_rule);
    IF v_err IS NOT NULL THEN
        RAISE EXCEPTION 'invalid rule: %', v_err USING ERRCODE = '22023';
    END IF;
    v_rule := pg_catalog.jsonb_build_object(
        'condition', p_rule -> 'condition',
        'per_wallet', coalesce(p_rule -> 'per_wallet', 'false'::jsonb),
        'stale_policy', coalesce(p_rule -> 'stale_policy', '"deny"'::jsonb));
    SELECT r.rule, r.version INTO v_old FROM public.access_rules r
    WHERE r.creator_id = p_creator AND r.feature = p_feature FOR UPDATE;
    IF FOUND THEN
        v_ver := v_old.version + 1;
        UPDATE public.access_rules SET rule = v_rule, version = v_ver, updated_by = p_actor,
            updated_at = pg_catalog.now()
        WHERE creator_id = p_creator AND feature = p_feature;
    ELSE
        v_ver := 1;
        INSERT INTO public.access_rules (creator_id, feature, rule, version, updated_by)
        VALUES (p_creator, p_feature, v_rule, v_ver, p_actor);
    END IF;
    INSERT INTO public.access_rule_changes (creator_id, feature, old_rule, new_rule, old_version, new_version, changed_by)
    VALUES (p_creator, p_feature, v_old.rule, v_rule, v_old.version, v_ver, p_actor);
    PERFORM pg_catalog.pg_notify('tw_access_rules', pg_catalog.jsonb_build_object(
        'creator_id', p_creator, 'feature', p_feature, 'version', v_ver)::text);
    RETURN v_ver;
END
$$;

-- Deletes the rule of (creator, feature); false if there was none. Recorded and announced.
CREATE FUNCTION public.tw_access_delete_rule(p_creator text, p_feature text, p_actor text)
RETURNS boolean
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_old record;
BEGIN
    IF p_actor IS NULL OR pg_catalog.length(p_actor) NOT BETWEEN 1 AND 200 THEN
        RAISE EXCEPTION 'actor must be 1 to 200 characters (who changes the rule)' USING ERRCODE = '22023';
    END IF;
    DELETE FROM public.access_rules r WHERE r.creator_id = p_creator AND r.feature = p_feature
    RETURNING r.rule, r.version INTO v_old;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    INSERT INTO public.access_rule_changes (creator_id, feature, old_rule, new_rule, old_version, new_version, changed_by)
    VALUES (p_creator, p_feature, v_old.rule, NULL, v_old.version, NULL, p_actor);
    PERFORM pg_catalog.pg_notify('tw_access_rules', pg_catalog.jsonb_build_object(
        'creator_id', p_creator, 'feature', p_feature, 'version', NULL)::text);
    RETURN true;
END
$$;

-- The service door for rule changes (trusted server code; the actor is recorded as given).
CREATE FUNCTION public.access_set_rule(p_creator text, p_feature text, p_rule jsonb, p_actor text)
RETURNS integer
LANGUAGE sql VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$ SELECT public.tw_access_set_rule(p_creator, p_feature, p_rule, p_actor) $$;

CREATE FUNCTION public.access_delete_rule(p_creator text, p_feature text, p_actor text)
RETURNS boolean
LANGUAGE sql VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$ SELECT public.tw_access_delete_rule(p_creator, p_feature, p_actor) $$;

-- Whether chain p_chain's index cannot be trusted now, and why (NULL when it can): a fault
-- stopped its indexer, it has no checkpoint yet, or it lags its head by more than
-- stale_after_blocks.
CREATE FUNCTION public.tw_access_chain_stale(p_chain bigint)
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_cp    bigint;
    v_head  bigint;
    v_max   bigint;
BEGIN
    IF EXISTS (SELECT FROM public.chain_indexer_faults f WHERE f.chain_id = p_chain) THEN
        RETURN 'the indexer of chain ' || p_chain || ' is stopped by a fault';
    END IF;
    SELECT c.block_number INTO v_cp FROM public.chain_checkpoints c WHERE c.chain_id = p_chain;
    IF NOT FOUND THEN
        RETURN 'chain ' || p_chain || ' has not been indexed yet';
    END IF;
    SELECT h.head INTO v_head FROM public.tw_access_chain_heads h WHERE h.chain_id = p_chain;
    SELECT s.stale_after_blocks INTO v_max FROM public.tw_access_settings s WHERE s.id = 1;
    IF v_head IS NOT NULL AND v_head - v_cp > v_max THEN
        RETURN 'the index of chain ' || p_chain || ' is ' || (v_head - v_cp) || ' blocks behind its head (more than ' || v_max || ')';
    END IF;
    RETURN NULL;
END
$$;

-- Evaluates one condition for the wallets of p_user. Returns
-- {passed, stale, evidence: [leaf, ...]}, each leaf
-- {path, kind, chain_id?, token?, snapshot_id?, minimum, amount, wallets: [{address, amount}],
--  block, source: index|snapshot, passed, stale?}.
CREATE FUNCTION public.tw_access_eval_node(p_user uuid, node jsonb, path text, per_wallet boolean)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_kind     text;
    v_body     jsonb;
    v_items    jsonb;
    v_k        integer;
    v_sub      jsonb;
    v_passes   integer := 0;
    v_stale    boolean := false;
    v_evidence jsonb := '[]'::jsonb;
    v_i        integer;
    v_chain    bigint;
    v_token    text;
    v_wallets  text[];
    v_min      numeric;
    v_amount   numeric;
    v_amounts  numeric[];
    v_block    bigint;
    v_per      jsonb;
    v_stale_why text;
    v_source   text := 'index';
    v_decimals integer;
    v_passed   boolean;
BEGIN
    SELECT k INTO v_kind FROM pg_catalog.jsonb_object_keys(node) k;
    v_body := node -> v_kind;
    path := path || '.' || v_kind;
    IF v_kind IN ('all', 'any', 'at_least') THEN
        IF v_kind = 'at_least' THEN
            v_items := v_body -> 'of';
            v_k := (v_body ->> 'k')::integer;
            path := path || '.of';
        ELSE
            v_items := v_body;
            v_k := CASE v_kind WHEN 'all' THEN pg_catalog.jsonb_array_length(v_items) ELSE 1 END;
        END IF;
        FOR v_i IN 0 .. pg_catalog.jsonb_array_length(v_items) - 1 LOOP
            v_sub := public.tw_access_eval_node(p_user, v_items -> v_i, path || '[' || v_i || ']', per_wallet);
            IF (v_sub ->> 'passed')::boolean THEN
                v_passes := v_passes + 1;
            END IF;
            v_stale := v_stale OR (v_sub ->> 'stale')::boolean;
            v_evidence := v_evidence || (v_sub -> 'evidence');
        END LOOP;
        RETURN pg_catalog.jsonb_build_object('passed', v_passes >= v_k, 'stale', v_stale, 'evidence', v_evidence);
    END IF;

    -- The leaf's chain first: it decides which wallets count (contract wallets only on the
    -- chains they were proven on).
    IF v_kind = 'snapshot' THEN
        -- A GoldRush snapshot names its chain (e.g. 'eth-mainnet'): contract wallets then do
        -- not count.
        SELECT s.decimals, s.block_height, CASE WHEN s.chain ~ '^[0-9]{1,18}$' THEN s.chain::bigint END, s.token
        INTO v_decimals, v_block, v_chain, v_token
        FROM public.snapshots s WHERE s.id = (v_body ->> 'snapshot_id')::uuid;
        v_source := 'snapshot';
    ELSE
        v_chain := (v_body ->> 'chain_id')::numeric::bigint;
        v_token := pg_catalog.lower(v_body ->> 'token');
        v_stale_why := public.tw_access_chain_stale(v_chain);
        SELECT c.block_number INTO v_block FROM public.chain_checkpoints c WHERE c.chain_id = v_chain;
    END IF;
    SELECT coalesce(pg_catalog.array_agg(w.address ORDER BY w.address), '{}') INTO v_wallets
    FROM public.user_wallets w
    WHERE w.user_id = p_user AND (w.method = 'eoa' OR v_chain = ANY (w.chains));
    -- One amount per wallet, in v_wallets' order.
    IF v_kind = 'snapshot' THEN
        v_min := public.tw_whole_to_base_units(v_body ->> 'min', v_decimals);
        v_amounts := ARRAY(SELECT coalesce(h.balance, 0)
            FROM pg_catalog.unnest(v_wallets) WITH ORDINALITY a(address, i)
            LEFT JOIN public.snapshot_holders h
              ON h.snapshot_id = (v_body ->> 'snapshot_id')::uuid AND h.holder = a.address
            ORDER BY a.i);
    ELSIF v_kind = 'erc20' THEN
        SELECT t.decimals INTO v_decimals FROM public.chain_tokens t
        WHERE t.chain_id = v_chain AND t.address = v_token;
        v_min := public.tw_whole_to_base_units(v_body ->> 'min', v_decimals);
        v_amounts := ARRAY(SELECT coalesce(b.balance, 0)
            FROM pg_catalog.unnest(v_wallets) WITH ORDINALITY a(address, i)
            LEFT JOIN public.token_balances b
              ON b.chain_id = v_chain AND b.token = v_token AND b.holder = a.address
            ORDER BY a.i);
    ELSIF v_body ? 'token_id' THEN
        v_min := 1;
        v_amounts := ARRAY(SELECT CASE WHEN n.owner IS NULL THEN 0 ELSE 1 END
            FROM pg_catalog.unnest(v_wallets) WITH ORDINALITY a(address, i)
            LEFT JOIN public.nft_owners n
              ON n.chain_id = v_chain AND n.token = v_token
             AND n.token_id = (v_body ->> 'token_id')::numeric AND n.owner = a.address
            ORDER BY a.i);
    ELSE
        v_min := (v_body ->> 'min_count')::numeric;
        v_amounts := ARRAY(SELECT (SELECT pg_catalog.count(*) FROM public.nft_owners n
                                   WHERE n.chain_id = v_chain AND n.token = v_token AND n.owner = a.address)
            FROM pg_catalog.unnest(v_wallets) WITH ORDINALITY a(address, i)
            ORDER BY a.i);
    END IF;
    -- The wallets count together (the sum), or one must meet the leaf alone (per_wallet).
    SELECT coalesce(pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object('address', x.address, 'amount', x.amount::text) ORDER BY x.address), '[]'::jsonb),
           CASE WHEN per_wallet THEN coalesce(pg_catalog.max(x.amount), 0) ELSE coalesce(pg_catalog.sum(x.amount), 0) END
    INTO v_per, v_amount
    FROM ROWS FROM (pg_catalog.unnest(v_wallets), pg_catalog.unnest(v_amounts)) AS x(address, amount);
    v_passed := v_amount >= v_min;
    RETURN pg_catalog.jsonb_build_object(
        'passed', v_passed,
        'stale', v_stale_why IS NOT NULL,
        'evidence', pg_catalog.jsonb_build_array(pg_catalog.jsonb_strip_nulls(pg_catalog.jsonb_build_object(
            'path', path, 'kind', v_kind, 'chain_id', v_chain, 'token', v_token,
            'snapshot_id', v_body ->> 'snapshot_id', 'token_id', v_body ->> 'token_id',
            'minimum', v_min::text, 'amount', v_amount::text, 'wallets', v_per,
            'block', v_block, 'source', v_source, 'passed', v_passed, 'stale', v_stale_why))));
END
$$;

-- THE access decision: may p_user use p_feature of p_creator now? Every door returns this.
-- {allowed, reason, creator_id, feature, rule_version, source, as_of_block, stale, evidence,
--  checked_at}. reason: null when allowed; no_rule, no_wallet, stale, or not_met otherwise.
-- p_default (the seed's form) is the condition used when no rule is set.
CREATE FUNCTION public.tw_access_evaluate(p_user uuid, p_creator text, p_feature text, p_default jsonb DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_rule    record;
    v_cond    jsonb;
    v_per     boolean;
    v_policy  text;
    v_version integer;
    v_res     jsonb;
    v_allowed boolean;
    v_reason  text;
    v_sources jsonb;
    v_base    jsonb;
BEGIN
    SELECT r.rule, r.version INTO v_rule FROM public.access_rules r
    WHERE r.creator_id = p_creator AND r.feature = p_feature;
    IF FOUND THEN
        v_cond := v_rule.rule -> 'condition';
        v_per := (v_rule.rule ->> 'per_wallet')::boolean;
        v_policy := v_rule.rule ->> 'stale_policy';
        v_version := v_rule.version;
    ELSIF p_default IS NOT NULL THEN
        v_cond := p_default;
        v_per := false;
        v_policy := 'deny';
        v_version := 0;
    END IF;
    v_base := pg_catalog.jsonb_build_object('creator_id', p_creator, 'feature', p_feature,
        'rule_version', v_version, 'checked_at', pg_catalog.now(), 'user_id', p_user);
    IF v_cond IS NULL THEN
        RETURN v_base || pg_catalog.jsonb_build_object('allowed', false, 'reason', 'no_rule',
            'source', 'index', 'as_of_block', NULL, 'stale', false, 'evidence', '[]'::jsonb);
    END IF;
    IF NOT EXISTS (SELECT FROM public.user_wallets w WHERE w.user_id = p_user) THEN
        RETURN v_base || pg_catalog.jsonb_build_object('allowed', false, 'reason', 'no_wallet',
            'source', 'index', 'as_of_block', NULL, 'stale', false, 'evidence', '[]'::jsonb);
    END IF;
    v_res := public.tw_access_eval_node(p_user, v_cond, '$.condition', v_per);
    v_allowed := (v_res ->> 'passed')::boolean;
    v_reason := CASE WHEN v_allowed THEN NULL ELSE 'not_met' END;
    IF (v_res ->> 'stale')::boolean AND v_policy = 'deny' THEN
        v_allowed := false;
        v_reason := 'stale';
    END IF;
    SELECT pg_catalog.jsonb_agg(DISTINCT e ->> 'source') INTO v_sources
    FROM pg_catalog.jsonb_array_elements(v_res -> 'evidence') e;
    RETURN v_base || pg_catalog.jsonb_build_object(
        'allowed', v_allowed, 'reason', v_reason,
        'source', CASE WHEN v_sources = '["snapshot"]'::jsonb THEN 'snapshot' ELSE 'index' END,
        'as_of_block', (SELECT pg_catalog.min((e ->> 'block')::bigint)
                        FROM pg_catalog.jsonb_array_elements(v_res -> 'evidence') e),
        'stale', (v_res ->> 'stale')::boolean,
        'evidence', v_res -> 'evidence');
END
$$;

-- The seed's default condition for `verify_access(user, token, feature)`: hold >= 1 whole token
-- (ERC-20) or >= 1 NFT (ERC-721) of p_token on p_chain. NULL when the token is not indexed.
CREATE FUNCTION public.tw_access_default_condition(p_chain bigint, p_token text)
RETURNS jsonb
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE t.standard
        WHEN 'erc721' THEN pg_catalog.jsonb_build_object('erc721', pg_catalog.jsonb_build_object(
            'chain_id', t.chain_id, 'token', t.address, 'min_count', 1))
        ELSE pg_catalog.jsonb_build_object('erc20', pg_catalog.jsonb_build_object(
            'chain_id', t.chain_id, 'token', t.address, 'min', '1')) END
    FROM public.chain_tokens t
    WHERE t.chain_id = p_chain AND t.address = pg_catalog.lower(p_token);
$$;

-- The seed's form: the rule of creator "<chain_id>:<token>" for p_feature, else holding >= 1.
CREATE FUNCTION public.tw_access_evaluate_token(p_user uuid, p_chain bigint, p_token text, p_feature text)
RETURNS jsonb
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT public.tw_access_evaluate(p_user, p_chain::text || ':' || pg_catalog.lower(p_token), p_feature,
        public.tw_access_default_condition(p_chain, p_token));
$$;

-- Doors. A signed-in user asks about themselves (auth.uid()); trusted server code about anyone.
CREATE FUNCTION public.verify_access(p_creator text, p_feature text)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_user uuid := auth.uid();
BEGIN
    IF v_user IS NULL THEN
        RAISE EXCEPTION 'verify_access needs a signed-in user' USING ERRCODE = '28000';
    END IF;
    RETURN public.tw_access_evaluate(v_user, p_creator, p_feature);
END
$$;

CREATE FUNCTION public.verify_access_for(p_user uuid, p_creator text, p_feature text)
RETURNS jsonb
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$ SELECT public.tw_access_evaluate(p_user, p_creator, p_feature) $$;

CREATE FUNCTION public.verify_token_access(p_chain bigint, p_token text, p_feature text)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_user uuid := auth.uid();
BEGIN
    IF v_user IS NULL THEN
        RAISE EXCEPTION 'verify_token_access needs a signed-in user' USING ERRCODE = '28000';
    END IF;
    RETURN public.tw_access_evaluate_token(v_user, p_chain, p_token, p_feature);
END
$$;

CREATE FUNCTION public.verify_token_access_for(p_user uuid, p_chain bigint, p_token text, p_feature text)
RETURNS jsonb
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$ SELECT public.tw_access_evaluate_token(p_user, p_chain, p_token, p_feature) $$;

-- The batch form: many users against one rule in one call (the seed's multicall batch, on the index).
CREATE FUNCTION public.verify_access_batch(p_users uuid[], p_creator text, p_feature text)
RETURNS TABLE (user_id uuid, decision jsonb)
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT u, public.tw_access_evaluate(u, p_creator, p_feature)
    FROM pg_catalog.unnest(p_users) WITH ORDINALITY AS x(u, i) ORDER BY i;
$$;

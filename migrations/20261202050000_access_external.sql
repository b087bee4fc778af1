-- External verifiers (issue 11, the second seed's TomoIntegrationService): a rule leaf
--   {"external": {"verifier": "tomo", "chain_id": 1, "contract": "0x…", "min": "1",
--                 "fallback_policy": "restrictive"|"permissive"?}}
-- asks a configured HTTP verifier whether the user's wallets hold at least `min` base units of
-- `contract` on chain `chain_id` (a chain tokenwarden need not index).
--
-- SQL cannot call HTTP, so the worker resolves external leaves first (HTTP, retries, circuit
-- breaker: src/access/verifiers/) and hands the answers to tw_access_evaluate_resolved as a
-- jsonb argument; the tree (all/any/at_least, per_wallet) is still decided here, in one place.
-- A leaf without a fresh answer — the verifier failed, its breaker is open, or the door is a SQL
-- function that cannot call out — is decided by the seed's fallback (verifyAccessWithFallback):
--   1. the last successful verification of the same leaf for the same question (user, creator,
--      feature) recorded in access_checks, if at most fallback_max_age_secs old and made with
--      wallets the user still has; its answer, marked source 'fallback', with its age;
--   2. else the policy: the leaf's fallback_policy, else the verifier's (restrictive = not
--      passed, permissive = passed), marked source 'fallback'.
-- (The queue door's cache comes before all this: a cached decision never asks the verifier.)
--
--   * public.tw_access_verifiers: the verifiers the worker is configured with (name, profile,
--     fallback settings), upserted by `tokenwarden run` / `migrate`; the leaf is validated
--     against it (an unknown name is refused with the JSON path).
--   * access_checks.source gains 'external' and 'fallback'.
-- tw_access_check_node and tw_access_eval_node are redefined from 20261202040100_access_erc1155.sql
-- (erc1155 and held branches kept) with the external branch added.
-- Every function runs with `search_path = pg_catalog, pg_temp` and names objects with their schema.

CREATE TABLE public.tw_access_verifiers (
    name                   text PRIMARY KEY CHECK (name ~ '^[a-z0-9_-]{1,64}$'),
    profile                text NOT NULL CHECK (profile IN ('tomo', 'alchemy')),
    fallback_max_age_secs  bigint NOT NULL CHECK (fallback_max_age_secs > 0),
    fallback_policy        text NOT NULL CHECK (fallback_policy IN ('restrictive', 'permissive')),
    updated_at             timestamptz NOT NULL DEFAULT pg_catalog.now()
);
ALTER TABLE public.tw_access_verifiers ENABLE ROW LEVEL SECURITY;

ALTER TABLE public.access_checks DROP CONSTRAINT access_checks_source_check;
ALTER TABLE public.access_checks ADD CONSTRAINT access_checks_source_check
    CHECK (source IN ('cache', 'index', 'snapshot', 'external', 'fallback'));

-- NULL when the body of an external leaf (at `path`) is valid, else "<path>: <what is wrong>".
CREATE FUNCTION public.tw_access_check_external(p_body jsonb, path text)
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_key     text;
    v_allowed text[] := ARRAY['verifier', 'chain_id', 'contract', 'min', 'fallback_policy'];
    v_known   text;
BEGIN
    IF pg_catalog.jsonb_typeof(p_body) IS DISTINCT FROM 'object' THEN
        RETURN path || ': must be an object';
    END IF;
    FOR v_key IN SELECT pg_catalog.jsonb_object_keys(p_body) LOOP
        IF NOT v_key = ANY (v_allowed) THEN
            RETURN path || '.' || v_key || ': unknown key (expected ' || pg_catalog.array_to_string(v_allowed, ', ') || ')';
        END IF;
    END LOOP;
    IF pg_catalog.jsonb_typeof(p_body -> 'verifier') IS DISTINCT FROM 'string' THEN
        RETURN path || '.verifier: must be the name of a verifier of access.verifiers';
    END IF;
    IF NOT EXISTS (SELECT FROM public.tw_access_verifiers v WHERE v.name = p_body ->> 'verifier') THEN
        SELECT pg_catalog.string_agg(v.name, ', ' ORDER BY v.name) INTO v_known FROM public.tw_access_verifiers v;
        RETURN path || '.verifier: unknown verifier "' || pg_catalog.left(p_body ->> 'verifier', 64)
            || '" (configured: ' || coalesce(v_known, 'none') || ')';
    END IF;
    IF pg_catalog.jsonb_typeof(p_body -> 'chain_id') IS DISTINCT FROM 'number'
       OR (p_body ->> 'chain_id')::numeric < 1
       OR (p_body ->> 'chain_id')::numeric > 9223372036854775807
       OR (p_body ->> 'chain_id')::numeric <> pg_catalog.trunc((p_body ->> 'chain_id')::numeric) THEN
        RETURN path || '.chain_id: must be a chain id (a positive integer)';
    END IF;
    IF pg_catalog.jsonb_typeof(p_body -> 'contract') IS DISTINCT FROM 'string'
       OR (p_body ->> 'contract') !~ '^0x[0-9a-fA-F]{40}$' THEN
        RETURN path || '.contract: must be a 0x-prefixed 20-byte hex address';
    END IF;
    IF p_body ? 'min' AND (pg_catalog.jsonb_typeof(p_body -> 'min') IS DISTINCT FROM 'string'
                           OR (p_body ->> 'min') !~ '^[0-9]{1,78}$'
                           OR (p_body ->> 'min')::numeric < 1) THEN
        RETURN path || '.min: must be a positive amount in base units as a decimal string, e.g. "1"';
    END IF;
    IF p_body ? 'fallback_policy' AND (p_body ->> 'fallback_policy') IS DISTINCT FROM 'restrictive'
       AND (p_body ->> 'fallback_policy') IS DISTINCT FROM 'permissive' THEN
        RETURN path || '.fallback_policy: must be "restrictive" or "permissive"';
    END IF;
    RETURN NULL;
END
$$;

-- Decides one external leaf for p_user's wallets p_wallets (those that count on its chain).
-- p_ctx: {creator_id, feature, external: {<path>: {leaf, verified_at, wallets: [{address,
-- amount} | {address, has_tokens}]} | {leaf, error}}}. Returns {passed, stale, evidence: [leaf]}
-- like tw_access_eval_node, the leaf with source 'external' (answered now) or 'fallback'.
CREATE FUNCTION public.tw_access_eval_external(p_user uuid, p_body jsonb, p_path text,
    p_per_wallet boolean, p_ctx jsonb, p_wallets text[])
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_name     text := p_body ->> 'verifier';
    v_chain    bigint := (p_body ->> 'chain_id')::numeric::bigint;
    v_contract text := pg_catalog.lower(p_body ->> 'contract');
    v_min      numeric := coalesce(p_body ->> 'min', '1')::numeric;
    v_res      jsonb := p_ctx -> 'external' -> p_path;
    v_max_age  bigint;
    v_policy   text;
    v_base     jsonb;
    v_count    integer;
    v_known    boolean;
    v_has      boolean;
    v_amount   numeric;
    v_per      jsonb;
    v_passed   boolean;
    v_prev     record;
BEGIN
    SELECT v.fallback_max_age_secs, v.fallback_policy INTO v_max_age, v_policy
    FROM public.tw_access_verifiers v WHERE v.name = v_name;
    v_policy := coalesce(p_body ->> 'fallback_policy', v_policy, 'restrictive');
    v_max_age := coalesce(v_max_age, 86400);
    v_base := pg_catalog.jsonb_build_object('path', p_path, 'kind', 'external', 'verifier', v_name,
        'chain_id', v_chain, 'token', v_contract, 'minimum', v_min::text);
    -- Answered now, for this very leaf (the rule may have changed since the worker read it)
    -- and for every wallet that counts.
    IF v_res IS NOT NULL AND v_res -> 'leaf' = p_body AND v_res ? 'wallets' THEN
        SELECT pg_catalog.count(*),
               pg_catalog.bool_and(w ? 'amount'),
               pg_catalog.bool_or(coalesce((w ->> 'has_tokens')::boolean, false)),
               CASE WHEN p_per_wallet THEN pg_catalog.max((w ->> 'amount')::numeric)
                    ELSE pg_catalog.sum((w ->> 'amount')::numeric) END,
               coalesce(pg_catalog.jsonb_agg(pg_catalog.jsonb_strip_nulls(pg_catalog.jsonb_build_object(
                   'address', w ->> 'address', 'amount', w ->> 'amount', 'has_tokens', w -> 'has_tokens'))
                   ORDER BY w ->> 'address'), '[]'::jsonb)
        INTO v_count, v_known, v_has, v_amount, v_per
        FROM pg_catalog.jsonb_array_elements(v_res -> 'wallets') w
        WHERE (w ->> 'address') = ANY (p_wallets);
        IF v_count = pg_catalog.cardinality(p_wallets) THEN
            -- A boolean profile (tomo) answers per wallet ("this wallet holds at least min").
            v_known := coalesce(v_known, true);
            v_passed := CASE WHEN v_known THEN coalesce(v_amount, 0) >= v_min ELSE v_has END;
            RETURN pg_catalog.jsonb_build_object('passed', v_passed, 'stale', false,
                'evidence', pg_catalog.jsonb_build_array(pg_catalog.jsonb_strip_nulls(v_base || pg_catalog.jsonb_build_object(
                    'amount', CASE WHEN v_known THEN coalesce(v_amount, 0)::text END,
                    'wallets', v_per, 'source', 'external', 'passed', v_passed,
                    'verified_at', v_res -> 'verified_at'))));
        END IF;
    END IF;
    -- Fallback 1: the last successful verification of the same leaf for the same question.
    SELECT e AS evidence, (e ->> 'verified_at')::timestamptz AS verified_at INTO v_prev
    FROM public.access_checks c
    CROSS JOIN LATERAL pg_catalog.jsonb_array_elements(c.evidence) e
    WHERE c.user_id = p_user
      AND c.creator_id = p_ctx ->> 'creator_id' AND c.feature = p_ctx ->> 'feature'
      AND c.checked_at >= pg_catalog.now() - pg_catalog.make_interval(secs => v_max_age)
      -- Only decisions that carry a verifier's answer (not the fallback decisions an outage
      -- piles up): a rule with an external leaf is decided 'external', 'fallback' or 'cache'.
      AND c.source IN ('external', 'cache')
      AND e ->> 'path' = p_path AND e ->> 'source' = 'external' AND e ->> 'verifier' = v_name
      AND e ->> 'token' = v_contract AND e ->> 'minimum' = v_min::text
      AND (e ->> 'chain_id')::bigint = v_chain
      AND (e ->> 'verified_at')::timestamptz >= pg_catalog.now() - pg_catalog.make_interval(secs => v_max_age)
      AND NOT EXISTS (SELECT FROM pg_catalog.jsonb_array_elements(e -> 'wallets') w
                      WHERE NOT (w ->> 'address') = ANY (p_wallets))
    ORDER BY (e ->> 'verified_at')::timestamptz DESC
    LIMIT 1;
    IF FOUND THEN
        RETURN pg_catalog.jsonb_build_object('passed', (v_prev.evidence ->> 'passed')::boolean, 'stale', false,
            'evidence', pg_catalog.jsonb_build_array(pg_catalog.jsonb_strip_nulls(v_prev.evidence || pg_catalog.jsonb_build_object(
                'source', 'fallback', 'fallback', 'last_verification',
                'age_secs', pg_catalog.floor(pg_catalog.date_part('epoch', pg_catalog.now() - v_prev.verified_at))::bigint,
                'external_error', v_res ->> 'error'))));
    END IF;
    -- Fallback 2: the policy.
    v_passed := v_policy = 'permissive';
    RETURN pg_catalog.jsonb_build_object('passed', v_passed, 'stale', false,
        'evidence', pg_catalog.jsonb_build_array(pg_catalog.jsonb_strip_nulls(v_base || pg_catalog.jsonb_build_object(
            'wallets', '[]'::jsonb, 'source', 'fallback', 'fallback', 'policy', 'policy', v_policy,
            'passed', v_passed, 'external_error', coalesce(v_res ->> 'error',
                CASE WHEN v_res IS NULL THEN 'not asked (this door cannot call a verifier)' END)))));
END
$$;

-- The external leaves of a condition, depth first: (path, leaf body).
CREATE FUNCTION public.tw_access_external_nodes(node jsonb, path text)
RETURNS TABLE (leaf_path text, leaf jsonb)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_kind  text;
    v_items jsonb;
    v_i     integer;
BEGIN
    SELECT k INTO v_kind FROM pg_catalog.jsonb_object_keys(node) k;
    path := path || '.' || v_kind;
    IF v_kind = 'external' THEN
        leaf_path := path;
        leaf := node -> v_kind;
        RETURN NEXT;
        RETURN;
    END IF;
    IF v_kind NOT IN ('all', 'any', 'at_least') THEN
        RETURN;
    END IF;
    IF v_kind = 'at_least' THEN
        v_items := node -> v_kind -> 'of';
        path := path || '.of';
    ELSE
        v_items := node -> v_kind;
    END IF;
    FOR v_i IN 0 .. pg_catalog.jsonb_array_length(v_items) - 1 LOOP
        RETURN QUERY SELECT * FROM public.tw_access_external_nodes(v_items -> v_i, path || '[' || v_i || ']');
    END LOOP;
END
$$;

-- What the worker must ask before evaluating p_user on (p_creator, p_feature): one row per
-- external leaf of the rule, with the user's wallets that count on its chain (none: no rule,
-- no external leaf).
CREATE FUNCTION public.tw_access_external_questions(p_user uuid, p_creator text, p_feature text)
RETURNS TABLE (leaf_path text, leaf jsonb, wallets text[])
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT n.leaf_path, n.leaf,
           coalesce((SELECT pg_catalog.array_agg(w.address ORDER BY w.address) FROM public.user_wallets w
                     WHERE w.user_id = p_user
                       AND (w.method = 'eoa' OR (n.leaf ->> 'chain_id')::numeric::bigint = ANY (w.chains))), '{}')
    FROM public.access_rules r
    CROSS JOIN LATERAL public.tw_access_external_nodes(r.rule -> 'condition', '$.condition') n
    WHERE r.creator_id = p_creator AND r.feature = p_feature;
$$;

-- Validation: the external leaf added (otherwise as 20261202010100_access_held.sql).
CREATE OR REPLACE FUNCTION public.tw_access_check_node(node jsonb, path text)
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
        RETURN path || ': a condition has exactly one key (all, any, at_least, erc20, erc721, erc1155, snapshot, held, external)';
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
    IF v_kind = 'external' THEN
        RETURN public.tw_access_check_external(v_body, path);
    END IF;
    IF v_kind NOT IN ('erc20', 'erc721', 'erc1155', 'snapshot', 'held') THEN
        RETURN path || ': unknown condition (all, any, at_least, erc20, erc721, erc1155, snapshot, held, external)';
    END IF;
    IF pg_catalog.jsonb_typeof(v_body) IS DISTINCT FROM 'object' THEN
        RETURN path || ': must be an object';
    END IF;
    v_allowed := CASE v_kind
        WHEN 'erc20' THEN ARRAY['chain_id', 'token', 'min']
        WHEN 'erc721' THEN ARRAY['chain_id', 'token', 'min_count', 'token_id']
        WHEN 'erc1155' THEN ARRAY['chain_id', 'token', 'token_id', 'min']
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
    IF v_kind = 'erc1155' THEN
        IF v_token.standard <> 'erc1155' THEN
            RETURN path || '.token: token is ' || v_token.standard || ', not erc1155';
        END IF;
        IF pg_catalog.jsonb_typeof(v_body -> 'token_id') IS DISTINCT FROM 'string'
           OR (v_body ->> 'token_id') !~ '^[0-9]{1,78}$' THEN
            RETURN path || '.token_id: must be a token id as a decimal string';
        END IF;
        IF pg_catalog.jsonb_typeof(v_body -> 'min') IS DISTINCT FROM 'string'
           OR (v_body ->> 'min') !~ '^[0-9]{1,78}$' OR (v_body ->> 'min')::numeric < 1 THEN
            RETURN path || '.min: must be a positive whole number of units of the id as a decimal string, e.g. "1"';
        END IF;
        RETURN NULL;
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
    -- held: a window that starts at a block, or a duration back from now (at most 366 days,
    -- the span of the head clock that prune keeps).
    IF (v_body ? 'since_block') = (v_body ? 'for_secs') THEN
        RETURN path || ': give exactly one of since_block and for_secs';
    END IF;
    IF v_body ? 'since_block' THEN
        IF pg_catalog.jsonb_typeof(v_body -> 'since_block') IS DISTINCT FROM 'number'
           OR (v_body ->> 'since_block')::numeric < 0
           OR (v_body ->> 'since_block')::numeric > 9223372036854775807
           OR (v_body ->> 'since_block')::numeric <> pg_catalog.trunc((v_body ->> 'since_block')::numeric) THEN
            RETURN path || '.since_block: must be a block number (a non-negative integer)';
        END IF;
    ELSIF pg_catalog.jsonb_typeof(v_body -> 'for_secs') IS DISTINCT FROM 'number'
          OR (v_body ->> 'for_secs')::numeric < 1
          OR (v_body ->> 'for_secs')::numeric > 31622400
          OR (v_body ->> 'for_secs')::numeric <> pg_catalog.trunc((v_body ->> 'for_secs')::numeric) THEN
        RETURN path || '.for_secs: must be a whole number of seconds from 1 to 31622400 (366 days)';
    END IF;
    RETURN NULL;
END
$$;

-- Evaluation with the context of the question (creator, feature, the verifiers' answers); the
-- external leaf added (otherwise as 20261202010100_access_held.sql). The 4-argument form, used
-- by callers that have no answers (whitelists), passes none.
CREATE OR REPLACE FUNCTION public.tw_access_eval_node(p_user uuid, node jsonb, path text, per_wallet boolean, p_ctx jsonb)
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
    v_from     bigint;
    v_to       bigint;
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
            v_sub := public.tw_access_eval_node(p_user, v_items -> v_i, path || '[' || v_i || ']', per_wallet, p_ctx);
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
    ELSIF v_kind = 'external' THEN
        -- A chain tokenwarden may not index: only its id matters (which wallets count).
        v_chain := (v_body ->> 'chain_id')::numeric::bigint;
    ELSE
        v_chain := (v_body ->> 'chain_id')::numeric::bigint;
        v_token := pg_catalog.lower(v_body ->> 'token');
        v_stale_why := public.tw_access_chain_stale(v_chain);
        SELECT c.block_number INTO v_block FROM public.chain_checkpoints c WHERE c.chain_id = v_chain;
    END IF;
    SELECT coalesce(pg_catalog.array_agg(w.address ORDER BY w.address), '{}') INTO v_wallets
    FROM public.user_wallets w
    WHERE w.user_id = p_user AND (w.method = 'eoa' OR v_chain = ANY (w.chains));
    IF v_kind = 'external' THEN
        RETURN public.tw_access_eval_external(p_user, v_body, path, per_wallet, p_ctx, v_wallets);
    END IF;
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
    ELSIF v_kind = 'erc1155' THEN
        -- Units of one id (ERC-1155 ids have no decimals), from the per-id balances.
        v_min := (v_body ->> 'min')::numeric;
        v_amounts := ARRAY(SELECT coalesce(b.balance, 0)
            FROM pg_catalog.unnest(v_wallets) WITH ORDINALITY a(address, i)
            LEFT JOIN public.chain_erc1155_balances b
              ON b.chain_id = v_chain AND b.token = v_token
             AND b.token_id = (v_body ->> 'token_id')::numeric AND b.holder = a.address
            ORDER BY a.i);
    ELSIF v_kind = 'held' THEN
        -- The lowest balance over the window [v_from, v_to]: per wallet, and (below) for the
        -- wallets together. v_to is the last block the index holds for the token.
        SELECT t.decimals, CASE WHEN t.status = 'live' THEN v_block
                                WHEN t.status IN ('paused', 'stopped', 'removed', 'backfilling') THEN t.indexed_to END
        INTO v_decimals, v_to
        FROM public.chain_tokens t WHERE t.chain_id = v_chain AND t.address = v_token;
        v_min := public.tw_whole_to_base_units(v_body ->> 'min', v_decimals);
        v_from := public.tw_access_held_from(v_chain, v_body);
        IF v_to IS NULL THEN
            v_stale_why := coalesce(v_stale_why, 'token ' || v_token || ' on chain ' || v_chain || ' has no indexed history yet');
        ELSIF v_from IS NULL THEN
            v_stale_why := coalesce(v_stale_why, 'no reading of chain ' || v_chain
                || '''s head is ' || (v_body ->> 'for_secs') || ' seconds old yet, so the window''s first block is unknown');
        ELSIF v_from > v_to + 1 THEN
            v_stale_why := coalesce(v_stale_why, 'block ' || v_from || ' is not indexed yet (indexed through ' || v_to || ')');
        END IF;
        v_block := v_to;
        v_amounts := ARRAY(SELECT CASE WHEN v_from IS NULL OR v_to IS NULL THEN 0
                                       ELSE public.tw_access_min_held(v_chain, v_token, ARRAY[a.address], v_from, v_to) END
            FROM pg_catalog.unnest(v_wallets) WITH ORDINALITY a(address, i)
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
    -- Held together: the minimum of the sum, not the sum of the minimums (a move between two
    -- of the user's wallets is no dip).
    IF v_kind = 'held' AND NOT per_wallet AND pg_catalog.cardinality(v_wallets) > 1
       AND v_from IS NOT NULL AND v_to IS NOT NULL THEN
        v_amount := public.tw_access_min_held(v_chain, v_token, v_wallets, v_from, v_to);
    END IF;
    v_passed := v_amount >= v_min;
    RETURN pg_catalog.jsonb_build_object(
        'passed', v_passed,
        'stale', v_stale_why IS NOT NULL,
        'evidence', pg_catalog.jsonb_build_array(pg_catalog.jsonb_strip_nulls(pg_catalog.jsonb_build_object(
            'path', path, 'kind', v_kind, 'chain_id', v_chain, 'token', v_token,
            'snapshot_id', v_body ->> 'snapshot_id', 'token_id', v_body ->> 'token_id',
            'window_from', v_from,
            'minimum', v_min::text, 'amount', v_amount::text, 'wallets', v_per,
            'block', v_block, 'source', v_source, 'passed', v_passed, 'stale', v_stale_why))));
END
$$;

CREATE OR REPLACE FUNCTION public.tw_access_eval_node(p_user uuid, node jsonb, path text, per_wallet boolean)
RETURNS jsonb
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT public.tw_access_eval_node(p_user, node, path, per_wallet, NULL::jsonb) $$;

-- THE access decision, with the verifiers' answers p_external ({<leaf path>: answer}, see
-- tw_access_eval_external). Owner only: an API role must not pass answers of its own. Adds
-- source 'external' (a leaf answered by a verifier now) and 'fallback' (a leaf decided by the
-- fallback), and evidence_age_secs: the age of the oldest fallback evidence.
CREATE FUNCTION public.tw_access_evaluate_resolved(p_user uuid, p_creator text, p_feature text, p_default jsonb, p_external jsonb)
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
    v_res := public.tw_access_eval_node(p_user, v_cond, '$.condition', v_per,
        pg_catalog.jsonb_build_object('creator_id', p_creator, 'feature', p_feature,
                                      'external', coalesce(p_external, '{}'::jsonb)));
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
        'source', CASE WHEN v_sources ? 'fallback' THEN 'fallback'
                       WHEN v_sources ? 'external' THEN 'external'
                       WHEN v_sources = '["snapshot"]'::jsonb THEN 'snapshot' ELSE 'index' END,
        'as_of_block', (SELECT pg_catalog.min((e ->> 'block')::bigint)
                        FROM pg_catalog.jsonb_array_elements(v_res -> 'evidence') e),
        'stale', (v_res ->> 'stale')::boolean,
        'evidence', v_res -> 'evidence')
        -- Only when a recorded verification was used (absent otherwise, like the Rust type).
        || coalesce((SELECT pg_catalog.jsonb_build_object('evidence_age_secs', pg_catalog.max((e ->> 'age_secs')::bigint))
                     FROM pg_catalog.jsonb_array_elements(v_res -> 'evidence') e
                     WHERE e ? 'age_secs' HAVING pg_catalog.count(*) > 0), '{}'::jsonb);
END
$$;

-- Every door without answers (the SQL functions, the monitor): external leaves by the fallback.
CREATE OR REPLACE FUNCTION public.tw_access_evaluate(p_user uuid, p_creator text, p_feature text, p_default jsonb DEFAULT NULL)
RETURNS jsonb
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT public.tw_access_evaluate_resolved(p_user, p_creator, p_feature, p_default, NULL) $$;

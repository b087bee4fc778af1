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
-- The rule tree's validation and evaluation with the external branch (tw_access_check_node,
-- tw_access_eval_node) are in 20261202070000_access_rule_tree.sql, with every leaf kind.
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

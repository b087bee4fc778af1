-- Faster access evaluation (issue 10's benchmark: the queue door's cold checks, the SQL doors).
-- The decisions are the same; only the work to reach them changes:
--   * tw_access_eval_node reads a node's kind without a query, and evaluates an erc20 leaf (the
--     common leaf, and the seed's default) with one query for the checkpoint, the decimals, the
--     user's wallets on the chain and their balances, instead of five;
--   * tw_access_evaluate_resolved reads the rule and whether the user has a wallet in one query,
--     and summarises a one-leaf decision without a query (a query over the evidence otherwise);
--   * tw_access_evaluate_many evaluates many questions in one statement (the queue door sends
--     the cold checks of a batch together): one round trip and one plan for all of them. With
--     p_ask_external, a question whose rule has an external leaf gets NULL: the worker asks the
--     verifiers first and evaluates it alone (tw_access_evaluate_resolved with their answers).
-- The tree stays defined in 20261202070000_access_rule_tree.sql's shape: this migration
-- redefines tw_access_eval_node whole (the leaves other than erc20 are unchanged).

-- The rule tree's evaluation (20261202070000_access_rule_tree.sql), erc20 in one query.
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
    -- The node's one key, read without a query for the known kinds (a query per node was a
    -- tenth of an evaluation's cost).
    v_kind := CASE WHEN node ? 'erc20' THEN 'erc20' WHEN node ? 'all' THEN 'all'
                   WHEN node ? 'any' THEN 'any' WHEN node ? 'at_least' THEN 'at_least'
                   WHEN node ? 'erc721' THEN 'erc721' WHEN node ? 'erc1155' THEN 'erc1155'
                   WHEN node ? 'snapshot' THEN 'snapshot' WHEN node ? 'held' THEN 'held'
                   WHEN node ? 'external' THEN 'external' END;
    IF v_kind IS NULL THEN
        SELECT k INTO v_kind FROM pg_catalog.jsonb_object_keys(node) k;
    END IF;
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

    -- erc20, the common leaf: the checkpoint, the decimals, the wallets that count on the chain
    -- and their balances in one query (the general path below takes five). Same evidence.
    IF v_kind = 'erc20' THEN
        v_chain := (v_body ->> 'chain_id')::numeric::bigint;
        v_token := pg_catalog.lower(v_body ->> 'token');
        v_stale_why := public.tw_access_chain_stale(v_chain);
        SELECT c.block_number, t.decimals, x.per, x.amount
        INTO v_block, v_decimals, v_per, v_amount
        FROM (SELECT) AS one
        LEFT JOIN public.chain_checkpoints c ON c.chain_id = v_chain
        LEFT JOIN public.chain_tokens t ON t.chain_id = v_chain AND t.address = v_token
        CROSS JOIN LATERAL (
            SELECT coalesce(pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object(
                       'address', w.address, 'amount', coalesce(b.balance, 0)::text) ORDER BY w.address), '[]'::jsonb) AS per,
                   CASE WHEN per_wallet THEN coalesce(pg_catalog.max(coalesce(b.balance, 0)), 0)
                        ELSE coalesce(pg_catalog.sum(coalesce(b.balance, 0)), 0) END AS amount
            FROM public.user_wallets w
            LEFT JOIN public.token_balances b
              ON b.chain_id = v_chain AND b.token = v_token AND b.holder = w.address
            WHERE w.user_id = p_user AND (w.method = 'eoa' OR v_chain = ANY (w.chains))) x;
        v_min := public.tw_whole_to_base_units(v_body ->> 'min', v_decimals);
        v_passed := v_amount >= v_min;
        RETURN pg_catalog.jsonb_build_object(
            'passed', v_passed,
            'stale', v_stale_why IS NOT NULL,
            'evidence', pg_catalog.jsonb_build_array(pg_catalog.jsonb_strip_nulls(pg_catalog.jsonb_build_object(
                'path', path, 'kind', v_kind, 'chain_id', v_chain, 'token', v_token,
                'minimum', v_min::text, 'amount', v_amount::text, 'wallets', v_per,
                'block', v_block, 'source', v_source, 'passed', v_passed, 'stale', v_stale_why))));
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


-- THE access decision (see 20261202050000_access_external.sql), with fewer queries.
CREATE OR REPLACE FUNCTION public.tw_access_evaluate_resolved(p_user uuid, p_creator text, p_feature text, p_default jsonb, p_external jsonb)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_rule       jsonb;
    v_version    integer;
    v_has_wallet boolean;
    v_cond       jsonb;
    v_per        boolean;
    v_policy     text;
    v_res        jsonb;
    v_allowed    boolean;
    v_reason     text;
    v_sources    jsonb;
    v_block      bigint;
    v_age        bigint;
    v_aged       bigint;
    v_one        jsonb;
    v_base       jsonb;
BEGIN
    SELECT r.rule, r.version, EXISTS (SELECT FROM public.user_wallets w WHERE w.user_id = p_user)
    INTO v_rule, v_version, v_has_wallet
    FROM (SELECT) AS one
    LEFT JOIN public.access_rules r ON r.creator_id = p_creator AND r.feature = p_feature;
    IF v_rule IS NOT NULL THEN
        v_cond := v_rule -> 'condition';
        v_per := (v_rule ->> 'per_wallet')::boolean;
        v_policy := v_rule ->> 'stale_policy';
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
    IF NOT v_has_wallet THEN
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
    -- The sources, the oldest block and the oldest fallback evidence over the leaves: read
    -- directly for one leaf, with one query over the evidence otherwise.
    IF pg_catalog.jsonb_array_length(v_res -> 'evidence') = 1 THEN
        v_one := v_res -> 'evidence' -> 0;
        v_sources := pg_catalog.jsonb_build_array(v_one ->> 'source');
        v_block := (v_one ->> 'block')::bigint;
        v_aged := CASE WHEN v_one ? 'age_secs' THEN 1 ELSE 0 END;
        v_age := (v_one ->> 'age_secs')::bigint;
    ELSE
        SELECT pg_catalog.jsonb_agg(DISTINCT e ->> 'source'), pg_catalog.min((e ->> 'block')::bigint),
               pg_catalog.count(*) FILTER (WHERE e ? 'age_secs'),
               pg_catalog.max((e ->> 'age_secs')::bigint) FILTER (WHERE e ? 'age_secs')
        INTO v_sources, v_block, v_aged, v_age
        FROM pg_catalog.jsonb_array_elements(v_res -> 'evidence') e;
    END IF;
    RETURN v_base || pg_catalog.jsonb_build_object(
        'allowed', v_allowed, 'reason', v_reason,
        'source', CASE WHEN v_sources ? 'fallback' THEN 'fallback'
                       WHEN v_sources ? 'external' THEN 'external'
                       WHEN v_sources = '["snapshot"]'::jsonb THEN 'snapshot' ELSE 'index' END,
        'as_of_block', v_block,
        'stale', (v_res ->> 'stale')::boolean,
        'evidence', v_res -> 'evidence')
        -- Only when a recorded verification was used (absent otherwise, like the Rust type).
        || CASE WHEN v_aged > 0 THEN pg_catalog.jsonb_build_object('evidence_age_secs', v_age)
                ELSE '{}'::jsonb END;
END
$$;

-- Many questions in one statement, in the order given: user i asks about (p_creators[i],
-- p_features[i]); p_chains[i] / p_tokens[i] name the token of the seed's form (its default
-- condition when creator "<chain>:<token>" has no rule), NULL for a creator's question. With
-- p_ask_external, a question whose rule has an external leaf is not evaluated (decision NULL):
-- the caller asks the verifiers and evaluates it with their answers. Owner only.
CREATE FUNCTION public.tw_access_evaluate_many(p_users uuid[], p_creators text[], p_features text[],
    p_chains bigint[], p_tokens text[], p_ask_external boolean)
RETURNS TABLE (ord integer, decision jsonb)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT q.i::integer,
           CASE WHEN p_ask_external AND r.rule IS NOT NULL
                     AND pg_catalog.jsonb_path_exists(r.rule -> 'condition', 'strict $.**.external')
                THEN NULL
                ELSE public.tw_access_evaluate_resolved(q.u, q.c, q.f,
                         CASE WHEN q.chain IS NULL THEN NULL
                              ELSE public.tw_access_default_condition(q.chain, q.token) END, NULL) END
    FROM ROWS FROM (pg_catalog.unnest(p_users), pg_catalog.unnest(p_creators), pg_catalog.unnest(p_features),
                    pg_catalog.unnest(p_chains), pg_catalog.unnest(p_tokens))
         WITH ORDINALITY AS q(u, c, f, chain, token, i)
    LEFT JOIN public.access_rules r ON r.creator_id = q.c AND r.feature = q.f
    ORDER BY q.i;
$$;

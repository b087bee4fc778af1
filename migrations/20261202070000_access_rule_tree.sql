-- The rule tree of access rules: validation (tw_access_check_node, when a rule is set) and
-- evaluation (tw_access_eval_node, for the wallets of a user) of every condition kind:
--   all / any / at_least {k, of}   combinators
--   erc20, erc721                  20261201095600_access_rules.sql
--   snapshot                       20261201095600_access_rules.sql
--   held                           20261202010100_access_held.sql (its window helpers)
--   erc1155                        20261202040000_chain_erc1155.sql (per-id balances)
--   external                       20261202050000_access_external.sql (verifiers, fallback)
-- These two functions were first written in 20261201095600_access_rules.sql (released); the
-- leaves added since are all here, in one definition, instead of one full copy per leaf's
-- migration. A change to the tree redefines them in a new migration, starting from this one.

-- Validation of a condition at the JSON path `path`: NULL when valid, else the path of the bad
-- node and what is wrong with it.
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

-- Evaluation with the context of the question (creator, feature, the verifiers' answers). Returns
-- {passed, stale, evidence: [leaf, ...]}. The 4-argument form, used
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

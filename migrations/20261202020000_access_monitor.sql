-- Access monitor (the seed's TokenBalanceMonitor, "what to do when a user loses access"): who
-- currently passes each rule, every change of that, and the one SQL function that computes the
-- changes, so the rule of a transition lives next to the evaluation (tw_access_evaluate).
--
--   * public.access_grants: one row per (user, creator, feature) that ever passed; revoked_at
--     NULL while the user passes. `since` is the start of the current (or last) grant.
--   * public.access_events: every transition (granted / revoked) with its reason (`met`, or the
--     decision's deny reason), its cause (balance_change, reorg, recheck, rule_change), the
--     chain and block the amounts were read at. `published_at` is set once the worker has put
--     the event on the Redis stream `{prefix}:access_changes` (the table is the outbox).
--   * public.tw_access_rule_tokens: the (chain, token) pairs each rule's leaves name, kept by a
--     trigger on access_rules, so an announcement finds the rules it concerns by index.
-- Only the worker (the owner) writes; users read their own grants and events.
-- Every function runs with `search_path = pg_catalog, pg_temp` and names objects with their schema.

CREATE TABLE public.access_grants (
    user_id       uuid NOT NULL,
    creator_id    text NOT NULL,
    feature       text NOT NULL,
    -- the rule's version at the last evaluation that kept or changed the grant
    rule_version  integer,
    since         timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    revoked_at    timestamptz,
    PRIMARY KEY (user_id, creator_id, feature)
);
CREATE INDEX access_grants_current ON public.access_grants (creator_id, feature, user_id)
    WHERE revoked_at IS NULL;
ALTER TABLE public.access_grants ENABLE ROW LEVEL SECURITY;
CREATE POLICY access_grants_own ON public.access_grants
    FOR SELECT TO authenticated
    USING ((select auth.uid()) = user_id);
CREATE POLICY access_grants_service ON public.access_grants
    FOR SELECT TO service_role
    USING (true);

CREATE TABLE public.access_events (
    id            bigserial PRIMARY KEY,
    user_id       uuid NOT NULL,
    creator_id    text NOT NULL,
    feature       text NOT NULL,
    kind          text NOT NULL CHECK (kind IN ('granted', 'revoked')),
    -- granted: 'met'; revoked: the decision's reason (not_met, no_wallet, no_rule)
    reason        text NOT NULL,
    cause         text NOT NULL CHECK (cause IN ('balance_change', 'reorg', 'recheck', 'rule_change')),
    rule_version  integer,
    chain_id      bigint,
    block         bigint,
    at            timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    published_at  timestamptz
);
CREATE INDEX access_events_user ON public.access_events (user_id, id);
CREATE INDEX access_events_unpublished ON public.access_events (id) WHERE published_at IS NULL;
ALTER TABLE public.access_events ENABLE ROW LEVEL SECURITY;
CREATE POLICY access_events_own ON public.access_events
    FOR SELECT TO authenticated
    USING ((select auth.uid()) = user_id);
CREATE POLICY access_events_service ON public.access_events
    FOR SELECT TO service_role
    USING (true);

CREATE TABLE public.tw_access_rule_tokens (
    creator_id  text NOT NULL,
    feature     text NOT NULL,
    chain_id    bigint NOT NULL,
    token       text NOT NULL,
    PRIMARY KEY (creator_id, feature, chain_id, token)
);
CREATE INDEX tw_access_rule_tokens_token ON public.tw_access_rule_tokens (chain_id, token);
ALTER TABLE public.tw_access_rule_tokens ENABLE ROW LEVEL SECURITY;

-- The (chain_id, token) pairs the leaves of a rule's condition name (erc20, erc721, held).
CREATE FUNCTION public.tw_access_condition_tokens(p_rule jsonb)
RETURNS TABLE (chain_id bigint, token text)
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT DISTINCT (l.v ->> 'chain_id')::numeric::bigint, pg_catalog.lower(l.v ->> 'token')
    FROM pg_catalog.jsonb_path_query(p_rule -> 'condition', 'strict $.**') AS l(v)
    WHERE pg_catalog.jsonb_typeof(l.v) = 'object' AND l.v ? 'chain_id' AND l.v ? 'token'
$$;

CREATE FUNCTION public.tw_access_rule_tokens_sync()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        DELETE FROM public.tw_access_rule_tokens t
        WHERE t.creator_id = OLD.creator_id AND t.feature = OLD.feature;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        INSERT INTO public.tw_access_rule_tokens (creator_id, feature, chain_id, token)
        SELECT NEW.creator_id, NEW.feature, x.chain_id, x.token
        FROM public.tw_access_condition_tokens(NEW.rule) x
        ON CONFLICT DO NOTHING;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER access_rules_tokens AFTER INSERT OR UPDATE OR DELETE ON public.access_rules
    FOR EACH ROW EXECUTE FUNCTION public.tw_access_rule_tokens_sync();

INSERT INTO public.tw_access_rule_tokens (creator_id, feature, chain_id, token)
SELECT r.creator_id, r.feature, x.chain_id, x.token
FROM public.access_rules r, public.tw_access_condition_tokens(r.rule) x
ON CONFLICT DO NOTHING;

-- Re-evaluates p_user on (p_creator, p_feature) and compares with access_grants: returns the
-- event written when the user starts or stops passing, nothing otherwise. A stale decision (an
-- index that cannot be trusted now) changes nothing: the next announcement or re-check decides.
-- p_chain names the chain whose change caused the re-evaluation (the event's chain and block);
-- NULL takes the first leaf's chain.
CREATE FUNCTION public.tw_access_transition(p_user uuid, p_creator text, p_feature text,
                                            p_cause text, p_chain bigint)
RETURNS SETOF public.access_events
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_d      jsonb;
    v_ver    integer;
    v_chain  bigint;
    v_block  bigint;
    v_kind   text;
    v_reason text;
    v_ev     public.access_events;
BEGIN
    v_d := public.tw_access_evaluate(p_user, p_creator, p_feature);
    IF (v_d ->> 'stale')::boolean THEN
        RETURN;
    END IF;
    v_ver := (v_d ->> 'rule_version')::integer;
    IF (v_d ->> 'allowed')::boolean THEN
        UPDATE public.access_grants g SET rule_version = v_ver
        WHERE g.user_id = p_user AND g.creator_id = p_creator AND g.feature = p_feature
          AND g.revoked_at IS NULL;
        IF FOUND THEN
            RETURN;
        END IF;
        INSERT INTO public.access_grants AS g (user_id, creator_id, feature, rule_version, since, revoked_at)
        VALUES (p_user, p_creator, p_feature, v_ver, pg_catalog.clock_timestamp(), NULL)
        ON CONFLICT (user_id, creator_id, feature) DO UPDATE
            SET since = EXCLUDED.since, revoked_at = NULL, rule_version = EXCLUDED.rule_version;
        v_kind := 'granted';
        v_reason := 'met';
    ELSE
        UPDATE public.access_grants g
        SET revoked_at = pg_catalog.clock_timestamp(), rule_version = coalesce(v_ver, g.rule_version)
        WHERE g.user_id = p_user AND g.creator_id = p_creator AND g.feature = p_feature
          AND g.revoked_at IS NULL;
        IF NOT FOUND THEN
            RETURN;
        END IF;
        v_kind := 'revoked';
        v_reason := v_d ->> 'reason';
    END IF;
    v_chain := coalesce(p_chain, (SELECT (e ->> 'chain_id')::bigint
                                  FROM pg_catalog.jsonb_array_elements(v_d -> 'evidence') e
                                  WHERE e ? 'chain_id' LIMIT 1));
    v_block := coalesce((SELECT pg_catalog.max((e ->> 'block')::bigint)
                         FROM pg_catalog.jsonb_array_elements(v_d -> 'evidence') e
                         WHERE (e ->> 'chain_id')::bigint = v_chain),
                        (v_d ->> 'as_of_block')::bigint);
    INSERT INTO public.access_events (user_id, creator_id, feature, kind, reason, cause,
                                      rule_version, chain_id, block)
    VALUES (p_user, p_creator, p_feature, v_kind, v_reason, p_cause, v_ver, v_chain, v_block)
    RETURNING * INTO v_ev;
    RETURN NEXT v_ev;
END
$$;

-- Re-evaluates p_users on one rule under the rule's transaction lock (so the monitor and a
-- re-check running on another replica never interleave their comparisons); returns the events.
CREATE FUNCTION public.tw_access_reevaluate(p_users uuid[], p_creator text, p_feature text,
                                            p_cause text, p_chain bigint)
RETURNS SETOF public.access_events
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtextextended(
        'tokenwarden.access.monitor:' || p_creator || E'\x1f' || p_feature, 0));
    RETURN QUERY
    SELECT e.*
    FROM (SELECT DISTINCT u FROM pg_catalog.unnest(p_users) u WHERE u IS NOT NULL ORDER BY u) x,
         LATERAL public.tw_access_transition(x.u, p_creator, p_feature, p_cause, p_chain) e;
END
$$;

-- What an announcement of the indexer means for access: the users whose wallets are among
-- p_holders (on p_chain) are re-evaluated on every rule that names p_token on p_chain.
CREATE FUNCTION public.tw_access_on_balance_change(p_chain bigint, p_token text, p_holders text[],
                                                   p_cause text)
RETURNS SETOF public.access_events
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_users uuid[];
    r       record;
BEGIN
    SELECT pg_catalog.array_agg(DISTINCT w.user_id) INTO v_users
    FROM public.user_wallets w
    WHERE w.address = ANY (SELECT pg_catalog.lower(h) FROM pg_catalog.unnest(p_holders) h)
      AND (w.method = 'eoa' OR p_chain = ANY (w.chains));
    IF v_users IS NULL THEN
        RETURN;
    END IF;
    FOR r IN SELECT t.creator_id, t.feature FROM public.tw_access_rule_tokens t
             WHERE t.chain_id = p_chain AND t.token = pg_catalog.lower(p_token)
             ORDER BY t.creator_id, t.feature LOOP
        RETURN QUERY SELECT * FROM public.tw_access_reevaluate(v_users, r.creator_id, r.feature, p_cause, p_chain);
    END LOOP;
END
$$;

-- Every user who may pass or currently passes (creator, feature): the current grants, plus
-- the proven owners of wallets holding any token the rule names (or in any snapshot it names).
-- A user holding none of them cannot pass (every leaf needs a positive amount). Ordered.
CREATE FUNCTION public.tw_access_recheck_candidates(p_creator text, p_feature text)
RETURNS SETOF uuid
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT u FROM (
        SELECT g.user_id AS u FROM public.access_grants g
        WHERE g.creator_id = p_creator AND g.feature = p_feature AND g.revoked_at IS NULL
        UNION
        SELECT w.user_id FROM public.tw_access_rule_tokens t
        JOIN public.token_balances b ON b.chain_id = t.chain_id AND b.token = t.token AND b.balance > 0
        JOIN public.user_wallets w ON w.address = b.holder AND (w.method = 'eoa' OR t.chain_id = ANY (w.chains))
        WHERE t.creator_id = p_creator AND t.feature = p_feature
        UNION
        SELECT w.user_id FROM public.tw_access_rule_tokens t
        JOIN public.nft_owners n ON n.chain_id = t.chain_id AND n.token = t.token
        JOIN public.user_wallets w ON w.address = n.owner AND (w.method = 'eoa' OR t.chain_id = ANY (w.chains))
        WHERE t.creator_id = p_creator AND t.feature = p_feature
        UNION
        SELECT w.user_id FROM public.access_rules r,
             pg_catalog.jsonb_path_query(r.rule -> 'condition', 'strict $.**') AS l(v)
        JOIN public.snapshot_holders h
          ON pg_catalog.jsonb_typeof(l.v) = 'object' AND l.v ? 'snapshot_id'
         AND h.snapshot_id = (l.v ->> 'snapshot_id')::uuid AND h.balance > 0
        JOIN public.user_wallets w ON w.address = h.holder
        WHERE r.creator_id = p_creator AND r.feature = p_feature
    ) c ORDER BY u
$$;

-- Every (creator, feature) a full re-check covers: the rules, and the deleted rules that still
-- have current grants (to revoke them with reason no_rule).
CREATE FUNCTION public.tw_access_recheck_rules()
RETURNS TABLE (creator_id text, feature text)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT r.creator_id, r.feature FROM public.access_rules r
    UNION
    SELECT DISTINCT g.creator_id, g.feature FROM public.access_grants g WHERE g.revoked_at IS NULL
    ORDER BY 1, 2
$$;

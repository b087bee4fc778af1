-- Whitelists (the second seed's flows 2 and 3): a creator opens a list with an access rule, a
-- window and an optional capacity; users ask for a place; the granted places end as an
-- allowlist (a Merkle root and proofs, built by the worker from whitelist_entries).
--
--   * public.whitelists: one row per list. `rule` is an access rule ({condition, per_wallet,
--     stale_policy}), validated by tw_access_check_rule (same JSON paths on errors) and stored
--     with its defaults filled in. `granted` counts the granted places: it is THE capacity
--     counter, changed only under the row's lock (see tw_whitelist_request), and a CHECK keeps
--     it within `capacity` whatever happens.
--   * public.whitelist_entries: one row per (whitelist, user) that asked inside the window:
--     granted (final) or refused with its reason (asking again re-decides). The decision (the
--     access evaluation with its evidence) is kept. A granted place names one proven wallet of
--     the user; an address holds at most one place per list.
-- Closing (or the window's end) freezes the list: every write to entries happens under the
-- whitelist row's lock after checking it is still open, and closing takes that lock.
-- Every function runs with `search_path = pg_catalog, pg_temp` and names objects with their schema.

CREATE TABLE public.whitelists (
    id          uuid PRIMARY KEY DEFAULT pg_catalog.gen_random_uuid(),
    creator_id  text NOT NULL CHECK (pg_catalog.length(creator_id) BETWEEN 1 AND 200),
    name        text NOT NULL CHECK (pg_catalog.length(name) BETWEEN 1 AND 200),
    rule        jsonb NOT NULL,
    opens_at    timestamptz NOT NULL,
    closes_at   timestamptz NOT NULL,
    -- NULL: no limit on the number of places
    capacity    integer CHECK (capacity > 0),
    granted     integer NOT NULL DEFAULT 0 CHECK (granted >= 0),
    status      text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'closed')),
    created_by  text NOT NULL CHECK (pg_catalog.length(created_by) BETWEEN 1 AND 200),
    created_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    closed_by   text,
    closed_at   timestamptz,
    CHECK (closes_at > opens_at),
    CHECK (capacity IS NULL OR granted <= capacity),
    CHECK ((status = 'closed') = (closed_at IS NOT NULL)),
    UNIQUE (creator_id, name)
);
ALTER TABLE public.whitelists ENABLE ROW LEVEL SECURITY;

CREATE TABLE public.whitelist_entries (
    whitelist_id  uuid NOT NULL REFERENCES public.whitelists (id),
    user_id       uuid NOT NULL,
    status        text NOT NULL CHECK (status IN ('granted', 'refused')),
    -- why refused: the decision's reason (not_met, no_wallet, stale, no_rule), or full,
    -- not_your_wallet, address_taken; NULL when granted
    reason        text CHECK (pg_catalog.length(reason) <= 100),
    -- the wallet holding the place (granted), lowercase hex
    address       text CHECK (address ~ '^0x[0-9a-f]{40}$'),
    -- the allowlist amount of the place (uint256): 1, one place
    amount        numeric(78, 0) NOT NULL DEFAULT 1 CHECK (amount > 0),
    -- the access decision this entry was decided on (evidence included)
    decision      jsonb NOT NULL,
    -- the request that decided the row; the same request id again gets this row back
    request_id    uuid NOT NULL,
    attempts      integer NOT NULL DEFAULT 1 CHECK (attempts >= 1),
    first_asked_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    decided_at    timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (whitelist_id, user_id),
    CHECK ((status = 'granted') = (reason IS NULL)),
    CHECK (status <> 'granted' OR address IS NOT NULL)
);
-- An address holds at most one place per list (a wallet may move between users).
CREATE UNIQUE INDEX whitelist_entries_one_place_per_address
    ON public.whitelist_entries (whitelist_id, address) WHERE status = 'granted';
ALTER TABLE public.whitelist_entries ENABLE ROW LEVEL SECURITY;
CREATE POLICY whitelist_entries_own ON public.whitelist_entries
    FOR SELECT TO authenticated
    USING ((select auth.uid()) = user_id);

-- The access decision of p_user against p_rule (a stored, normalised rule), in the shape of
-- tw_access_evaluate's: the same tree evaluation (tw_access_eval_node), the same reasons
-- (no_wallet, not_met, stale), `creator_id` the list's creator and `feature` 'whitelist:<id>'.
CREATE FUNCTION public.tw_whitelist_evaluate(p_user uuid, p_whitelist uuid, p_creator text, p_rule jsonb)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_res     jsonb;
    v_allowed boolean;
    v_reason  text;
    v_sources jsonb;
    v_base    jsonb;
BEGIN
    v_base := pg_catalog.jsonb_build_object('creator_id', p_creator,
        'feature', 'whitelist:' || p_whitelist::text, 'rule_version', 1,
        'checked_at', pg_catalog.now(), 'user_id', p_user);
    IF NOT EXISTS (SELECT FROM public.user_wallets w WHERE w.user_id = p_user) THEN
        RETURN v_base || pg_catalog.jsonb_build_object('allowed', false, 'reason', 'no_wallet',
            'source', 'index', 'as_of_block', NULL, 'stale', false, 'evidence', '[]'::jsonb);
    END IF;
    v_res := public.tw_access_eval_node(p_user, p_rule -> 'condition', '$.condition',
        (p_rule ->> 'per_wallet')::boolean);
    v_allowed := (v_res ->> 'passed')::boolean;
    v_reason := CASE WHEN v_allowed THEN NULL ELSE 'not_met' END;
    IF (v_res ->> 'stale')::boolean AND p_rule ->> 'stale_policy' = 'deny' THEN
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

-- Opens a whitelist for the window [lower, upper) of p_window; returns its id. Refused with SQLSTATE 22023 and what is wrong (the rule's
-- JSON path, like access rules); a second list of the same name for a creator: 23505.
CREATE FUNCTION public.tw_whitelist_open(p_creator text, p_name text, p_rule jsonb,
    p_window tstzrange, p_capacity integer, p_actor text)
RETURNS uuid
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_err       text;
    v_id        uuid;
    v_opens_at  timestamptz := pg_catalog.lower(p_window);
    v_closes_at timestamptz := pg_catalog.upper(p_window);
BEGIN
    IF p_creator IS NULL OR pg_catalog.length(p_creator) NOT BETWEEN 1 AND 200 THEN
        RAISE EXCEPTION 'creator_id must be 1 to 200 characters' USING ERRCODE = '22023';
    END IF;
    IF p_name IS NULL OR pg_catalog.length(p_name) NOT BETWEEN 1 AND 200 THEN
        RAISE EXCEPTION 'name must be 1 to 200 characters' USING ERRCODE = '22023';
    END IF;
    IF p_actor IS NULL OR pg_catalog.length(p_actor) NOT BETWEEN 1 AND 200 THEN
        RAISE EXCEPTION 'actor must be 1 to 200 characters (who opens the list)' USING ERRCODE = '22023';
    END IF;
    IF v_opens_at IS NULL OR v_closes_at IS NULL OR v_closes_at <= v_opens_at THEN
        RAISE EXCEPTION 'the window must have an opening and a later closing time (got %)', p_window USING ERRCODE = '22023';
    END IF;
    IF v_closes_at <= pg_catalog.now() THEN
        RAISE EXCEPTION 'closes_at (%) is already past', v_closes_at USING ERRCODE = '22023';
    END IF;
    IF p_capacity IS NOT NULL AND p_capacity < 1 THEN
        RAISE EXCEPTION 'capacity must be at least 1 (or absent: no limit)' USING ERRCODE = '22023';
    END IF;
    v_err := public.tw_access_check_rule(p_rule);
    IF v_err IS NOT NULL THEN
        RAISE EXCEPTION 'invalid rule: %', v_err USING ERRCODE = '22023';
    END IF;
    INSERT INTO public.whitelists (creator_id, name, rule, opens_at, closes_at, capacity, created_by)
    VALUES (p_creator, p_name, pg_catalog.jsonb_build_object(
                'condition', p_rule -> 'condition',
                'per_wallet', coalesce(p_rule -> 'per_wallet', 'false'::jsonb),
                'stale_policy', coalesce(p_rule -> 'stale_policy', '"deny"'::jsonb)),
            v_opens_at, v_closes_at, p_capacity, p_actor)
    RETURNING id INTO v_id;
    RETURN v_id;
END
$$;

-- Closes a whitelist: its entries are frozen from the commit on. True when this call closed
-- it, false when it was closed already; an unknown id is SQLSTATE 22023.
CREATE FUNCTION public.tw_whitelist_close(p_whitelist uuid, p_actor text)
RETURNS boolean
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_status text;
BEGIN
    IF p_actor IS NULL OR pg_catalog.length(p_actor) NOT BETWEEN 1 AND 200 THEN
        RAISE EXCEPTION 'actor must be 1 to 200 characters (who closes the list)' USING ERRCODE = '22023';
    END IF;
    SELECT l.status INTO v_status FROM public.whitelists l WHERE l.id = p_whitelist FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'whitelist % does not exist', p_whitelist USING ERRCODE = '22023';
    END IF;
    IF v_status = 'closed' THEN
        RETURN false;
    END IF;
    UPDATE public.whitelists SET status = 'closed', closed_at = pg_catalog.now(), closed_by = p_actor
    WHERE id = p_whitelist;
    RETURN true;
END
$$;

-- The reply about a stored entry: the row as it is.
CREATE FUNCTION public.tw_whitelist_entry_reply(p_whitelist uuid, p_user uuid)
RETURNS jsonb
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT pg_catalog.jsonb_build_object('whitelist_id', e.whitelist_id, 'user_id', e.user_id,
        'decided_by_request', e.request_id, 'status', e.status, 'reason', e.reason, 'address', e.address,
        'amount', CASE WHEN e.status = 'granted' THEN e.amount::text END,
        'decision', e.decision, 'decided_at', e.decided_at)
    FROM public.whitelist_entries e WHERE e.whitelist_id = p_whitelist AND e.user_id = p_user;
$$;

-- The reply of a refusal that is not stored (unknown list, outside the window).
CREATE FUNCTION public.tw_whitelist_refusal(p_whitelist uuid, p_user uuid, p_request uuid, p_reason text)
RETURNS jsonb
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT pg_catalog.jsonb_build_object('whitelist_id', p_whitelist, 'user_id', p_user,
        'decided_by_request', p_request, 'status', 'refused', 'reason', p_reason, 'address', NULL,
        'amount', NULL, 'decision', NULL, 'decided_at', pg_catalog.now());
$$;

-- A user asks for a place on a whitelist. Returns {whitelist_id, user_id, request_id,
-- decided_by_request, status: granted|refused, reason, address, amount, decision, decided_at}
-- (decided_by_request: the request whose decision this is).
--   * A granted place is final: asking again returns it. The same request id as the one that
--     decided a refused entry returns that entry; a new request re-decides a refusal.
--   * Refused and not stored: unknown_whitelist, not_open (before opens_at), closed (closed or
--     past closes_at: the list is frozen).
--   * Refused and stored: the decision's reason (no_wallet, not_met, stale), full (capacity
--     reached), not_your_wallet (p_address is not a wallet the user proved), address_taken
--     (that wallet holds a place through another user).
-- The access evaluation runs before the lock; the capacity counter, the freeze and the entry
-- change under the whitelist row's lock, so N concurrent requests for C places grant exactly
-- min(N, C).
CREATE FUNCTION public.tw_whitelist_request(p_whitelist uuid, p_user uuid, p_request uuid, p_address text)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_list     record;
    v_entry    record;
    v_decision jsonb;
    v_address  text;
    v_reason   text;
    v_now      timestamptz := pg_catalog.now();
BEGIN
    IF p_user IS NULL THEN
        RAISE EXCEPTION 'a whitelist request needs a user (not signed in?)' USING ERRCODE = '28000';
    END IF;
    IF p_request IS NULL THEN
        RAISE EXCEPTION 'a whitelist request needs a request id' USING ERRCODE = '22023';
    END IF;
    IF p_address IS NOT NULL AND p_address !~ '^0x[0-9a-fA-F]{40}$' THEN
        RAISE EXCEPTION 'address % is not a 0x-prefixed 20-byte hex address', p_address USING ERRCODE = '22023';
    END IF;
    SELECT l.* INTO v_list FROM public.whitelists l WHERE l.id = p_whitelist;
    IF NOT FOUND THEN
        RETURN public.tw_whitelist_refusal(p_whitelist, p_user, p_request, 'unknown_whitelist');
    END IF;
    SELECT e.* INTO v_entry FROM public.whitelist_entries e
    WHERE e.whitelist_id = p_whitelist AND e.user_id = p_user;
    IF FOUND AND (v_entry.status = 'granted' OR v_entry.request_id = p_request) THEN
        RETURN public.tw_whitelist_entry_reply(p_whitelist, p_user);
    END IF;
    IF v_list.status = 'closed' OR v_now >= v_list.closes_at THEN
        RETURN public.tw_whitelist_refusal(p_whitelist, p_user, p_request, 'closed');
    END IF;
    IF v_now < v_list.opens_at THEN
        RETURN public.tw_whitelist_refusal(p_whitelist, p_user, p_request, 'not_open');
    END IF;

    v_decision := public.tw_whitelist_evaluate(p_user, p_whitelist, v_list.creator_id, v_list.rule);
    -- The place's wallet: the one asked for (it must be the user's), else the user's first proven.
    IF p_address IS NOT NULL THEN
        SELECT w.address INTO v_address FROM public.user_wallets w
        WHERE w.user_id = p_user AND w.address = pg_catalog.lower(p_address);
        IF NOT FOUND THEN
            v_reason := 'not_your_wallet';
        END IF;
    ELSE
        SELECT w.address INTO v_address FROM public.user_wallets w
        WHERE w.user_id = p_user ORDER BY w.verified_at, w.address LIMIT 1;
    END IF;
    IF v_reason IS NULL AND NOT (v_decision ->> 'allowed')::boolean THEN
        v_reason := v_decision ->> 'reason';
    END IF;

    -- Everything below is serialised per list: the freeze, the counter, the entry.
    SELECT l.* INTO v_list FROM public.whitelists l WHERE l.id = p_whitelist FOR UPDATE;
    IF v_list.status = 'closed' OR pg_catalog.clock_timestamp() >= v_list.closes_at THEN
        RETURN public.tw_whitelist_refusal(p_whitelist, p_user, p_request, 'closed');
    END IF;
    SELECT e.* INTO v_entry FROM public.whitelist_entries e
    WHERE e.whitelist_id = p_whitelist AND e.user_id = p_user;
    IF FOUND AND (v_entry.status = 'granted' OR v_entry.request_id = p_request) THEN
        RETURN public.tw_whitelist_entry_reply(p_whitelist, p_user);
    END IF;
    IF v_reason IS NULL AND v_list.capacity IS NOT NULL AND v_list.granted >= v_list.capacity THEN
        v_reason := 'full';
    END IF;
    IF v_reason IS NULL AND EXISTS (SELECT FROM public.whitelist_entries e
            WHERE e.whitelist_id = p_whitelist AND e.address = v_address AND e.status = 'granted') THEN
        v_reason := 'address_taken';
    END IF;
    IF v_reason IS NULL THEN
        UPDATE public.whitelists SET granted = granted + 1 WHERE id = p_whitelist;
    ELSE
        v_address := NULL;
    END IF;
    INSERT INTO public.whitelist_entries AS e (whitelist_id, user_id, status, reason, address, decision, request_id)
    VALUES (p_whitelist, p_user, CASE WHEN v_reason IS NULL THEN 'granted' ELSE 'refused' END,
            v_reason, v_address, v_decision, p_request)
    ON CONFLICT (whitelist_id, user_id) DO UPDATE
        SET status = excluded.status, reason = excluded.reason, address = excluded.address,
            decision = excluded.decision, request_id = excluded.request_id,
            attempts = e.attempts + 1, decided_at = pg_catalog.now();
    RETURN public.tw_whitelist_entry_reply(p_whitelist, p_user);
END
$$;

-- Doors. Trusted server code (service_role) opens and closes lists for creators and reads
-- them; a signed-in user asks for a place for themselves (auth.uid()).
CREATE FUNCTION public.whitelist_open(p_creator text, p_name text, p_rule jsonb,
    p_window tstzrange, p_capacity integer, p_actor text)
RETURNS uuid
LANGUAGE sql VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$ SELECT public.tw_whitelist_open(p_creator, p_name, p_rule, p_window, p_capacity, p_actor) $$;

CREATE FUNCTION public.whitelist_close(p_whitelist uuid, p_actor text)
RETURNS boolean
LANGUAGE sql VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$ SELECT public.tw_whitelist_close(p_whitelist, p_actor) $$;

-- supabase.rpc('request_whitelist', {p_whitelist, p_address}) → the reply above. Not signed
-- in: SQLSTATE 28000. Each call is a new request (a granted place is returned as it is).
CREATE FUNCTION public.request_whitelist(p_whitelist uuid, p_address text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_user uuid := auth.uid();
BEGIN
    IF v_user IS NULL THEN
        RAISE EXCEPTION 'request_whitelist needs a signed-in user' USING ERRCODE = '28000';
    END IF;
    RETURN public.tw_whitelist_request(p_whitelist, v_user, pg_catalog.gen_random_uuid(), p_address);
END
$$;

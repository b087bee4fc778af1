-- Audit of access checks (the seed's VerificationAuditService): every decision any door gives is
-- one row of public.access_checks.
--
--   * The queue door (`verify_access` job) records its decisions in batches, one multi-row
--     INSERT per batch, committed before the replies are sent (src/access/audit.rs); cached
--     answers are recorded too (source 'cache').
--   * The SQL doors record their own decision (one INSERT per call, one per batch call): they
--     become VOLATILE. Through PostgREST the caller's IP (first X-Forwarded-For entry) and user
--     agent come from the request headers PostgREST sets in `request.headers`.
--   * Users read their own rows (RLS); service_role reads all (BYPASSRLS); only the worker
--     (the owner) and these SECURITY DEFINER functions write.
--   * `prune` deletes rows older than access.audit.retention_days, in bounded batches; the
--     maintenance rule `verification_storm` counts rows per user in a sliding window.
-- Every function runs with `search_path = pg_catalog, pg_temp` and names objects with their schema.

CREATE TABLE public.access_checks (
    id           bigserial PRIMARY KEY,
    -- when this check was answered (for a cached answer: now, not when it was computed)
    checked_at   timestamptz NOT NULL DEFAULT pg_catalog.now(),
    -- when the decision was computed (the decision's checked_at; older for a cached answer)
    decided_at   timestamptz NOT NULL,
    user_id      uuid NOT NULL,
    creator_id   text NOT NULL CHECK (pg_catalog.length(creator_id) BETWEEN 1 AND 200),
    feature      text NOT NULL CHECK (pg_catalog.length(feature) BETWEEN 1 AND 100),
    -- NULL without a rule (no_rule), 0 for the seed's default
    rule_version integer,
    allowed      boolean NOT NULL,
    reason       text CHECK (reason IN ('no_rule', 'no_wallet', 'stale', 'not_met')),
    source       text NOT NULL CHECK (source IN ('cache', 'index', 'snapshot')),
    -- which door answered: the verify_access job, a SQL function, the CLI
    door         text NOT NULL CHECK (door IN ('queue', 'sql', 'cli')),
    as_of_block  bigint,
    stale        boolean NOT NULL,
    evidence     jsonb NOT NULL,
    request_id   uuid,
    caller_ip    inet,
    user_agent   text CHECK (pg_catalog.length(user_agent) <= 512),
    CHECK (allowed = (reason IS NULL))
);
-- A user's own rows, newest first (RLS reads), and the storm rule's per-user windows.
CREATE INDEX access_checks_user_time ON public.access_checks (user_id, checked_at);
-- Retention (oldest first) and the storm rule's lookback.
CREATE INDEX access_checks_time ON public.access_checks (checked_at);
ALTER TABLE public.access_checks ENABLE ROW LEVEL SECURITY;
CREATE POLICY access_checks_own ON public.access_checks
    FOR SELECT TO authenticated
    USING ((select auth.uid()) = user_id);

-- The caller's IP and user agent as PostgREST passes them (`request.headers`), NULLs outside
-- PostgREST or when a header is missing or malformed. The IP is the first X-Forwarded-For
-- entry: the client as the proxy in front of PostgREST saw it. The user agent is cut to 512
-- characters with control characters removed.
CREATE FUNCTION public.tw_access_request_meta(OUT caller_ip inet, OUT user_agent text)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_raw     text := pg_catalog.current_setting('request.headers', true);
    v_headers jsonb;
    v_ip      text;
BEGIN
    IF v_raw IS NULL OR v_raw = '' THEN
        RETURN;
    END IF;
    BEGIN
        v_headers := v_raw::jsonb;
    EXCEPTION WHEN OTHERS THEN
        RETURN;
    END;
    IF pg_catalog.jsonb_typeof(v_headers) IS DISTINCT FROM 'object' THEN
        RETURN;
    END IF;
    v_ip := pg_catalog.btrim(pg_catalog.split_part(v_headers ->> 'x-forwarded-for', ',', 1));
    IF v_ip ~ '^[0-9a-fA-F:.]{2,45}$' THEN
        BEGIN
            caller_ip := v_ip::inet;
        EXCEPTION WHEN OTHERS THEN
            caller_ip := NULL;
        END;
    END IF;
    user_agent := pg_catalog.left(
        pg_catalog.regexp_replace(v_headers ->> 'user-agent', '[[:cntrl:]]', '', 'g'), 512);
END
$$;

-- Records decisions given by the SQL doors: one INSERT for all of them.
CREATE FUNCTION public.tw_access_record(p_decisions jsonb[])
RETURNS void
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO public.access_checks (decided_at, user_id, creator_id, feature, rule_version,
        allowed, reason, source, door, as_of_block, stale, evidence, caller_ip, user_agent)
    SELECT (d ->> 'checked_at')::timestamptz, (d ->> 'user_id')::uuid, d ->> 'creator_id',
           d ->> 'feature', (d ->> 'rule_version')::integer, (d ->> 'allowed')::boolean,
           d ->> 'reason', d ->> 'source', 'sql', (d ->> 'as_of_block')::bigint,
           (d ->> 'stale')::boolean, d -> 'evidence', m.caller_ip, m.user_agent
    FROM pg_catalog.unnest(p_decisions) AS d, public.tw_access_request_meta() AS m;
$$;

-- The SQL doors of 20261201095600_access_rules.sql, now recording what they answer.
CREATE OR REPLACE FUNCTION public.verify_access(p_creator text, p_feature text)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_user     uuid := auth.uid();
    v_decision jsonb;
BEGIN
    IF v_user IS NULL THEN
        RAISE EXCEPTION 'verify_access needs a signed-in user' USING ERRCODE = '28000';
    END IF;
    v_decision := public.tw_access_evaluate(v_user, p_creator, p_feature);
    PERFORM public.tw_access_record(ARRAY[v_decision]);
    RETURN v_decision;
END
$$;

CREATE OR REPLACE FUNCTION public.verify_access_for(p_user uuid, p_creator text, p_feature text)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_decision jsonb := public.tw_access_evaluate(p_user, p_creator, p_feature);
BEGIN
    PERFORM public.tw_access_record(ARRAY[v_decision]);
    RETURN v_decision;
END
$$;

CREATE OR REPLACE FUNCTION public.verify_token_access(p_chain bigint, p_token text, p_feature text)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_user     uuid := auth.uid();
    v_decision jsonb;
BEGIN
    IF v_user IS NULL THEN
        RAISE EXCEPTION 'verify_token_access needs a signed-in user' USING ERRCODE = '28000';
    END IF;
    v_decision := public.tw_access_evaluate_token(v_user, p_chain, p_token, p_feature);
    PERFORM public.tw_access_record(ARRAY[v_decision]);
    RETURN v_decision;
END
$$;

CREATE OR REPLACE FUNCTION public.verify_token_access_for(p_user uuid, p_chain bigint, p_token text, p_feature text)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_decision jsonb := public.tw_access_evaluate_token(p_user, p_chain, p_token, p_feature);
BEGIN
    PERFORM public.tw_access_record(ARRAY[v_decision]);
    RETURN v_decision;
END
$$;

CREATE OR REPLACE FUNCTION public.verify_access_batch(p_users uuid[], p_creator text, p_feature text)
RETURNS TABLE (user_id uuid, decision jsonb)
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_decisions jsonb[];
BEGIN
    v_decisions := ARRAY(SELECT public.tw_access_evaluate(u, p_creator, p_feature)
                         FROM pg_catalog.unnest(p_users) WITH ORDINALITY AS x(u, i) ORDER BY i);
    PERFORM public.tw_access_record(v_decisions);
    RETURN QUERY SELECT p_users[i], v_decisions[i]
                 FROM pg_catalog.generate_subscripts(v_decisions, 1) AS i ORDER BY i;
END
$$;

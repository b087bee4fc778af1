-- Maintenance: the scheduler's tick records and the seed's burst-detection function.
--
-- scheduler_ticks: one row per (job, scheduled tick). The replica whose INSERT creates the row
-- owns the tick and runs it; every other replica's INSERT hits the primary key and does nothing.
-- That is what makes each tick run once across any number of `tokenwarden run` replicas.

CREATE TABLE public.scheduler_ticks (
    job          text        NOT NULL,
    scheduled_at timestamptz NOT NULL,
    claimed_by   text        NOT NULL,
    claimed_at   timestamptz NOT NULL DEFAULT pg_catalog.now(),
    -- claimed: inserted, not started yet; running; succeeded; failed (error set, panics and
    -- shutdown interruptions included); skipped (the job's previous run was still going).
    status       text        NOT NULL DEFAULT 'claimed'
                 CHECK (status IN ('claimed', 'running', 'succeeded', 'failed', 'skipped')),
    -- Ticks that fell due while no replica was running and were folded into this one.
    missed_ticks integer     NOT NULL DEFAULT 0 CHECK (missed_ticks >= 0),
    started_at   timestamptz NULL,
    finished_at  timestamptz NULL,
    result       jsonb       NULL,
    error        text        NULL,
    PRIMARY KEY (job, scheduled_at)
);

CREATE INDEX scheduler_ticks_claimed_at_idx ON public.scheduler_ticks (claimed_at);

-- Operator data: no policy, so only the worker (table owner) reads and writes it. Supabase's
-- default privileges grant public tables to the API roles; take them back as well.
ALTER TABLE public.scheduler_ticks ENABLE ROW LEVEL SECURITY;
REVOKE ALL ON public.scheduler_ticks FROM anon, authenticated, service_role;

-- The seed's `detect_high_frequency_requests`: how many ledger requests `p_user_id` made in the
-- last `p_time_window`, and whether that reaches `p_threshold`. Counts consumption-type
-- requests (consume and hold), whatever their outcome: a burst of refused requests is still a
-- burst. plpgsql so the migration applies before the ledger tables exist in a fresh database
-- (the ledger migration runs first in practice; this keeps the order irrelevant).
CREATE FUNCTION public.detect_high_frequency_requests(
    p_user_id uuid,
    p_time_window interval,
    p_threshold integer
)
RETURNS TABLE (is_high_frequency boolean, request_count bigint)
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
    v_count bigint;
BEGIN
    IF p_user_id IS NULL OR p_time_window IS NULL OR p_threshold IS NULL THEN
        RAISE EXCEPTION 'detect_high_frequency_requests: arguments must not be null'
            USING ERRCODE = '22004';
    END IF;
    IF p_time_window <= interval '0' OR p_threshold < 1 THEN
        RAISE EXCEPTION 'detect_high_frequency_requests: window must be positive and threshold at least 1 (got %, %)',
            p_time_window, p_threshold
            USING ERRCODE = '22023';
    END IF;
    SELECT pg_catalog.count(*) INTO v_count
      FROM public.ledger_requests r
     WHERE r.user_id = p_user_id
       AND r.kind IN ('consume', 'hold')
       AND r.created_at > pg_catalog.now() - p_time_window;
    RETURN QUERY SELECT v_count >= p_threshold, v_count;
END;
$$;

REVOKE ALL ON FUNCTION public.detect_high_frequency_requests(uuid, interval, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION public.detect_high_frequency_requests(uuid, interval, integer)
    TO service_role;

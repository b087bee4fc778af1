-- The SQL doors' record without a WAL flush of its own (issue 10, docs/access.md#audit).
--
-- Recording made every SQL-door check a write transaction, so each call waited for its WAL
-- flush: verify_access_for fell from ~3,000 to ~300 calls/s at 2 clients. A check's record is
-- an audit row, not money: losing the last fraction of a second of them in a Postgres crash
-- is acceptable, blocking every check on a disk flush is not. So when the check is the first
-- write of its transaction (no transaction id assigned yet), the record switches that
-- transaction to `synchronous_commit = off` (the commit returns before its WAL is flushed;
-- the WAL writer flushes it within 3 × wal_writer_delay, 600 ms by default; a crash in that
-- window loses the row, never half of it, and never reorders it against durable commits).
--
-- The setting lasts until the end of the transaction, so it would also cover whatever the
-- caller writes AFTER the check in the same transaction (a debit through
-- consume_tokens_atomic, say): that would not be acceptable. A deferred constraint trigger
-- runs at commit and puts the caller's setting back if the transaction wrote any row outside
-- access_checks (tw_access_rows_written, read when the record goes asynchronous and again at
-- commit). What it cannot see: TRUNCATE and DDL after a
-- check in the same transaction; those commit asynchronously (documented).
-- A transaction that wrote before the check keeps its own setting untouched.
-- The worker's queue door does not use this function: its batches stay durable before the reply.

-- Rows this backend inserted, updated or deleted in tables other than access_checks, as the
-- statistics system counts them: this transaction's writes (live subtransactions included)
-- plus those of earlier transactions not yet flushed to the shared statistics (flushed at most
-- once a second, never inside a transaction). So within one transaction the number only grows,
-- and it grows exactly when the transaction writes such a row: the guard compares it with its
-- value when the record went asynchronous. pg_class directly, not the pg_stat_xact_user_tables
-- view: the view's join with pg_index and GROUP BY cost ~0.7 ms per call on the loaded 2-core
-- machine, this ~0.17 ms (PL/pgSQL: its plan is cached). Tables, partitions and materialized views outside pg_catalog (TOAST
-- rows go with their table).
CREATE FUNCTION public.tw_access_rows_written()
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN (SELECT coalesce(pg_catalog.sum(pg_catalog.pg_stat_get_xact_tuples_inserted(c.oid)
                                         + pg_catalog.pg_stat_get_xact_tuples_updated(c.oid)
                                         + pg_catalog.pg_stat_get_xact_tuples_deleted(c.oid)), 0)::bigint
            FROM pg_catalog.pg_class c
            WHERE c.relkind IN ('r', 'p', 'm')
              AND c.relnamespace <> 'pg_catalog'::pg_catalog.regnamespace
              AND c.oid <> 'public.access_checks'::pg_catalog.regclass);
END
$$;

CREATE OR REPLACE FUNCTION public.tw_access_record(p_decisions jsonb[])
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_commit text := pg_catalog.current_setting('synchronous_commit');
BEGIN
    IF pg_catalog.txid_current_if_assigned() IS NULL AND v_commit <> 'off' THEN
        -- Remember the caller's setting: the commit-time guard restores it if needed.
        PERFORM pg_catalog.set_config('tokenwarden.audit_commit', v_commit, true);
        PERFORM pg_catalog.set_config('tokenwarden.audit_rows_before',
                                      public.tw_access_rows_written()::text, true);
        PERFORM pg_catalog.set_config('synchronous_commit', 'off', true);
    END IF;
    INSERT INTO public.access_checks (decided_at, user_id, creator_id, feature, rule_version,
        allowed, reason, source, door, as_of_block, stale, evidence, caller_ip, user_agent)
    SELECT (d ->> 'checked_at')::timestamptz, (d ->> 'user_id')::uuid, d ->> 'creator_id',
           d ->> 'feature', (d ->> 'rule_version')::integer, (d ->> 'allowed')::boolean,
           d ->> 'reason', d ->> 'source', 'sql', (d ->> 'as_of_block')::bigint,
           (d ->> 'stale')::boolean, d -> 'evidence', m.caller_ip, m.user_agent
    FROM pg_catalog.unnest(p_decisions) AS d, public.tw_access_request_meta() AS m;
END
$$;

-- At commit: a transaction the record made asynchronous gets its caller's setting back when
-- it wrote rows of any other table. Once per transaction (the marker is cleared).
-- SECURITY DEFINER: a deferred trigger runs as the committing role (service_role, say), which
-- may not call tw_access_rows_written.
CREATE FUNCTION public.tw_access_checks_commit_guard()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_commit text := pg_catalog.current_setting('tokenwarden.audit_commit', true);
    v_base   bigint;
BEGIN
    IF v_commit IS NULL OR v_commit = '' THEN
        RETURN NULL;
    END IF;
    v_base := pg_catalog.current_setting('tokenwarden.audit_rows_before')::bigint;
    PERFORM pg_catalog.set_config('tokenwarden.audit_commit', '', true);
    IF public.tw_access_rows_written() > v_base THEN
        PERFORM pg_catalog.set_config('synchronous_commit', v_commit, true);
    END IF;
    RETURN NULL;
END
$$;

CREATE CONSTRAINT TRIGGER access_checks_commit_guard
    AFTER INSERT ON public.access_checks
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW
    WHEN (NEW.door = 'sql')
    EXECUTE FUNCTION public.tw_access_checks_commit_guard();

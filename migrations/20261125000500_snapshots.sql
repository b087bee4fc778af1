-- Holder snapshots: "who held token T at block N", from GoldRush (Covalent) token_holders_v2 or
-- from the own chain index, and the address check callers run against them.
--
-- Visibility decision: holder snapshots are public chain data (anyone can recompute them from the
-- chain), so snapshots are readable by anon and authenticated. Holder rows are readable only
-- while their snapshot is `complete`: rows of a pending crawl (still being written) or of a failed
-- one (deleted on failure, but hidden anyway) are never visible as a finished answer.
-- Writes: only the worker (table owner). No INSERT/UPDATE/DELETE policies.

CREATE TABLE public.snapshots (
    id            uuid PRIMARY KEY,
    -- The snapshot_create job's request id, when the snapshot came from a job: a repeated request
    -- id gets the same snapshot back instead of a second crawl.
    request_id    uuid UNIQUE,
    source        text NOT NULL CHECK (source IN ('goldrush', 'index')),
    -- GoldRush chain name (e.g. 'eth-mainnet') or decimal chain id, as the caller gave it
    -- (index snapshots always use the decimal chain id).
    chain         text NOT NULL CHECK (length(chain) BETWEEN 1 AND 100),
    token         text NOT NULL CHECK (token ~ '^0x[0-9a-f]{40}$'),
    -- The block the holders describe: the requested one, or the first GoldRush page's
    -- block_height; NULL only while unknown (pending) or when the token had no holders at all.
    block_height  bigint CHECK (block_height >= 0),
    -- The token's decimals, used to turn whole-token thresholds into base units.
    -- NULL when the source did not say (verify_address_in_snapshot then refuses to convert).
    decimals      integer CHECK (decimals BETWEEN 0 AND 77),
    holder_count  bigint CHECK (holder_count >= 0),
    total_supply  numeric(78, 0) CHECK (total_supply >= 0),
    status        text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'complete', 'failed')),
    error         text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    completed_at  timestamptz,
    CHECK ((status = 'failed') = (error IS NOT NULL)),
    CHECK ((status = 'pending') = (completed_at IS NULL))
);

CREATE INDEX snapshots_token_idx ON public.snapshots (chain, token, created_at DESC);

CREATE TABLE public.snapshot_holders (
    -- No foreign key: an FK check per row would cost more than the COPY itself on a
    -- million-holder crawl. Rows are only written by the worker for a snapshot it has just
    -- inserted, and the trigger below removes them with their snapshot.
    snapshot_id uuid NOT NULL,
    -- Lowercase 0x hex, validated by the worker before the COPY. No regex CHECK here: it costs
    -- ~40 µs per row, more than the rest of the insert (measured in docs/benchmarks.md).
    holder      text NOT NULL,
    balance     numeric(78, 0) NOT NULL CHECK (balance > 0),
    PRIMARY KEY (snapshot_id, holder)
);

-- Deleting a snapshot deletes its holders (what ON DELETE CASCADE would do).
CREATE FUNCTION public.tw_snapshots_delete_holders()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = ''
AS $$
BEGIN
    DELETE FROM public.snapshot_holders WHERE snapshot_id = OLD.id;
    RETURN OLD;
END
$$;

CREATE TRIGGER snapshots_delete_holders
    AFTER DELETE ON public.snapshots
    FOR EACH ROW EXECUTE FUNCTION public.tw_snapshots_delete_holders();

ALTER TABLE public.snapshots ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.snapshot_holders ENABLE ROW LEVEL SECURITY;

CREATE POLICY snapshots_public_read ON public.snapshots
    FOR SELECT TO anon, authenticated USING (true);

CREATE POLICY snapshot_holders_public_read_complete ON public.snapshot_holders
    FOR SELECT TO anon, authenticated
    USING (EXISTS (
        SELECT 1 FROM public.snapshots s
        WHERE s.id = snapshot_holders.snapshot_id AND s.status = 'complete'
    ));

GRANT SELECT ON public.snapshots, public.snapshot_holders TO anon, authenticated;

-- Converts a whole-token amount written in decimal ("10", "1.5", "0.000001") into base units
-- with the token's own decimals. More fractional digits than the token has is an error, never a
-- silent rounding. Kept separate so the CLI and verify_address_in_snapshot share one rule.
CREATE FUNCTION public.tw_whole_to_base_units(p_amount text, p_decimals integer)
RETURNS numeric
LANGUAGE plpgsql IMMUTABLE
SET search_path = ''
AS $$
DECLARE
    v_int  text;
    v_frac text;
BEGIN
    IF p_amount IS NULL OR p_amount !~ '^[0-9]+(\.[0-9]+)?$' THEN
        RAISE EXCEPTION 'min_amount % is not a non-negative decimal number of whole tokens (e.g. "10" or "1.5")',
            coalesce('"' || p_amount || '"', 'NULL')
            USING ERRCODE = '22023';
    END IF;
    IF p_decimals IS NULL OR p_decimals < 0 OR p_decimals > 77 THEN
        RAISE EXCEPTION 'token decimals % are unknown or out of range; cannot convert min_amount "%" to base units',
            coalesce(p_decimals::text, 'NULL'), p_amount
            USING ERRCODE = '22023';
    END IF;
    v_int := split_part(p_amount, '.', 1);
    -- Trailing zeros carry no value: "1.50" is "1.5".
    v_frac := rtrim(split_part(p_amount, '.', 2), '0');
    IF length(v_frac) > p_decimals THEN
        RAISE EXCEPTION 'min_amount "%" has % fractional digits but the token has only % decimals',
            p_amount, length(v_frac), p_decimals
            USING ERRCODE = '22023';
    END IF;
    -- Exact text arithmetic: "1.5" with 6 decimals is "1" || "500000".
    RETURN (v_int || rpad(v_frac, p_decimals, '0'))::numeric;
END
$$;

-- Does p_wallet hold at least p_min_amount WHOLE tokens in snapshot p_snapshot_id?
-- Callable through supabase.rpc('verify_address_in_snapshot', {...}). The address is compared
-- case-insensitively. An unknown, pending or failed snapshot is an error (SQLSTATE P0002 for
-- unknown, 55000 for not complete), never `false`: "we don't know" must not read as "no".
CREATE FUNCTION public.verify_address_in_snapshot(
    p_snapshot_id uuid,
    p_wallet text,
    p_min_amount text
)
RETURNS boolean
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
    v_snap    record;
    v_wallet  text;
    v_min     numeric;
    v_balance numeric;
BEGIN
    SELECT s.status, s.decimals, s.error INTO v_snap
    FROM public.snapshots s WHERE s.id = p_snapshot_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'snapshot % does not exist', p_snapshot_id USING ERRCODE = 'P0002';
    END IF;
    IF v_snap.status <> 'complete' THEN
        RAISE EXCEPTION 'snapshot % is %, not complete%', p_snapshot_id, v_snap.status,
            coalesce(' (' || v_snap.error || ')', '')
            USING ERRCODE = '55000';
    END IF;
    v_wallet := lower(btrim(coalesce(p_wallet, '')));
    IF v_wallet !~ '^0x[0-9a-f]{40}$' THEN
        RAISE EXCEPTION 'wallet "%" is not a 0x-prefixed 20-byte hex address', p_wallet
            USING ERRCODE = '22023';
    END IF;
    v_min := public.tw_whole_to_base_units(btrim(p_min_amount), v_snap.decimals);
    SELECT h.balance INTO v_balance
    FROM public.snapshot_holders h
    WHERE h.snapshot_id = p_snapshot_id AND h.holder = v_wallet;
    RETURN coalesce(v_balance, 0) >= v_min;
END
$$;

REVOKE ALL ON FUNCTION public.verify_address_in_snapshot(uuid, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION public.verify_address_in_snapshot(uuid, text, text)
    TO anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION public.tw_whole_to_base_units(text, integer)
    TO anon, authenticated, service_role;

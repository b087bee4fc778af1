-- verify_address_in_snapshot refuses a minimum of zero: `holds at least 0` is true for every
-- address, so a zero (or a default that became zero) would have answered "yes" to anyone.
-- Same signature, same privileges (see security/privileges.txt).

-- Does p_wallet hold at least p_min_amount WHOLE tokens in snapshot p_snapshot_id?
-- Callable through supabase.rpc('verify_address_in_snapshot', {...}). The address is compared
-- case-insensitively. An unknown, pending or failed snapshot is an error (SQLSTATE P0002 for
-- unknown, 55000 for not complete), never `false`: "we don't know" must not read as "no".
CREATE OR REPLACE FUNCTION public.verify_address_in_snapshot(
    p_snapshot_id uuid,
    p_wallet text,
    p_min_amount text
)
RETURNS boolean
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
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
    -- "At least 0" is true of every address, holders or not: a caller who sent 0 (or a default
    -- that became 0) would grant access to everyone. Refuse it like any other bad amount.
    IF v_min <= 0 THEN
        RAISE EXCEPTION 'min_amount "%" must be greater than zero', p_min_amount
            USING ERRCODE = '22023';
    END IF;
    SELECT h.balance INTO v_balance
    FROM public.snapshot_holders h
    WHERE h.snapshot_id = p_snapshot_id AND h.holder = v_wallet;
    RETURN coalesce(v_balance, 0) >= v_min;
END
$$;


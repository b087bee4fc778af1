-- Tokens as data: `chain_tokens` is the tracked-token list of each chain (the config seeds it).
-- Operators and callers change it through public.chain_token_request (the CLI `tokenwarden
-- index token …`, the `index_token` job and service_role all go through it); the chain's
-- leading indexer applies each request within seconds (it polls the table) and is the only
-- writer of `status`, `indexed_to` and the token's chain data.
--
-- status (written by the indexer):
--   pending      requested, not yet seen by a leader
--   backfilling  its own backfill from start_block runs; data complete up to indexed_to
--   live         moves with the chain checkpoint (indexed_to is NULL)
--   paused       not indexed; data complete up to indexed_to (resume backfills the gap)
--   stopped      not indexed because of `reason` (e.g. a balance that would go negative)
--   removed      no longer tracked; rows deleted (indexed_to NULL) or kept (indexed_to set)
-- requested (written by chain_token_request): live | paused | removed.

ALTER TABLE public.chain_tokens
    ADD COLUMN status text NOT NULL DEFAULT 'live'
        CHECK (status IN ('pending', 'backfilling', 'live', 'paused', 'stopped', 'removed')),
    ADD COLUMN requested text NOT NULL DEFAULT 'live'
        CHECK (requested IN ('live', 'paused', 'removed')),
    ADD COLUMN keep_rows boolean NOT NULL DEFAULT false,
    ADD COLUMN indexed_to bigint NULL,
    ADD COLUMN backfill_logs bigint NOT NULL DEFAULT 0,
    ADD COLUMN backfill_started_at timestamptz NULL,
    ADD COLUMN reason text NULL,
    ADD COLUMN origin text NOT NULL DEFAULT 'config'
        CHECK (origin IN ('config', 'request', 'factory')),
    ADD COLUMN updated_at timestamptz NOT NULL DEFAULT pg_catalog.now();

-- One door for every change of the catalogue: validates, records the request, wakes nobody
-- (leaders poll `updated_at`). Returns the token's requested state.
--   add     (p_standard erc20|erc721 and p_start_block required) a new token, or a removed one
--           again (its kept rows resume, deleted rows are rebuilt from start_block)
--   pause   stop indexing it; resume backfills what it missed
--   resume  index it again
--   remove  stop tracking it; its rows are deleted in one transaction unless p_keep_rows
CREATE FUNCTION public.chain_token_request(
    p_chain_id bigint,
    p_address text,
    p_action text,
    p_standard text,
    p_start_block bigint,
    p_keep_rows boolean
)
RETURNS text
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_address text := lower(btrim(coalesce(p_address, '')));
    v_row     record;
BEGIN
    IF p_chain_id IS NULL OR p_chain_id <= 0 THEN
        RAISE EXCEPTION 'chain id % is not a positive integer', p_chain_id USING ERRCODE = '22023';
    END IF;
    IF v_address !~ '^0x[0-9a-f]{40}$' THEN
        RAISE EXCEPTION 'token address "%" is not a 0x-prefixed 20-byte hex address', p_address
            USING ERRCODE = '22023';
    END IF;
    SELECT t.status, t.requested, t.standard INTO v_row
    FROM public.chain_tokens t WHERE t.chain_id = p_chain_id AND t.address = v_address
    FOR UPDATE;
    CASE p_action
    WHEN 'add' THEN
        IF p_standard IS NULL OR p_standard NOT IN ('erc20', 'erc721') THEN
            RAISE EXCEPTION 'standard "%" of token % is not erc20 or erc721', p_standard, v_address
                USING ERRCODE = '22023';
        END IF;
        IF p_start_block IS NULL OR p_start_block < 0 THEN
            RAISE EXCEPTION 'start block % of token % is not a block number', p_start_block, v_address
                USING ERRCODE = '22023';
        END IF;
        IF NOT FOUND THEN
            INSERT INTO public.chain_tokens (chain_id, address, standard, start_block, status,
                                             requested, origin)
            VALUES (p_chain_id, v_address, p_standard, p_start_block, 'pending', 'live', 'request');
        ELSIF v_row.status = 'removed' THEN
            UPDATE public.chain_tokens t
               SET requested = 'live', keep_rows = false, updated_at = pg_catalog.now(),
                   -- deleted rows are rebuilt from the new start block; kept ones resume
                   start_block = CASE WHEN t.indexed_to IS NULL THEN p_start_block ELSE t.start_block END,
                   standard = CASE WHEN t.indexed_to IS NULL THEN p_standard ELSE t.standard END
             WHERE t.chain_id = p_chain_id AND t.address = v_address;
        ELSIF v_row.standard <> p_standard THEN
            RAISE EXCEPTION 'token % on chain % is already tracked as %', v_address, p_chain_id,
                v_row.standard USING ERRCODE = '23505';
        END IF;
        RETURN 'live';
    WHEN 'pause', 'resume', 'remove' THEN
        IF NOT FOUND OR (v_row.status = 'removed' AND v_row.requested = 'removed') THEN
            RAISE EXCEPTION 'token % is not tracked on chain %', v_address, p_chain_id
                USING ERRCODE = 'P0002';
        END IF;
        UPDATE public.chain_tokens t
           SET requested = CASE p_action WHEN 'pause' THEN 'paused'
                                         WHEN 'resume' THEN 'live' ELSE 'removed' END,
               keep_rows = (p_action = 'remove' AND coalesce(p_keep_rows, false)),
               updated_at = pg_catalog.now()
         WHERE t.chain_id = p_chain_id AND t.address = v_address;
        RETURN CASE p_action WHEN 'pause' THEN 'paused' WHEN 'resume' THEN 'live' ELSE 'removed' END;
    ELSE
        RAISE EXCEPTION 'action "%" is not add, pause, resume or remove', p_action
            USING ERRCODE = '22023';
    END CASE;
END
$$;

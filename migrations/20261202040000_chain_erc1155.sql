-- ERC-1155 in the chain index: `TransferSingle` / `TransferBatch` logs of tokens whose standard
-- is `erc1155`, per-(token, id, holder) balances and per-id supply. Written only by the worker's
-- indexer in its batch and reorg-undo transactions (ChainStore is the only gateway); readable
-- by everyone (public chain data), like the other chain tables. Amounts are uint256 as
-- numeric(78,0), addresses lowercase 0x hex.

ALTER TABLE public.chain_tokens DROP CONSTRAINT chain_tokens_standard_check;
ALTER TABLE public.chain_tokens ADD CONSTRAINT chain_tokens_standard_check
    CHECK (standard IN ('erc20', 'erc721', 'erc1155'));

-- One row per transfer: a TransferSingle log is one row (position 0), a TransferBatch log one
-- row per element of its arrays (position = index in the arrays), so the primary key names
-- exactly one transfer. Reorg undo and own-index snapshots read these.
CREATE TABLE public.chain_erc1155_transfers (
    chain_id     bigint        NOT NULL,
    block_number bigint        NOT NULL,
    block_hash   text          NOT NULL,
    log_index    int           NOT NULL,
    position     int           NOT NULL CHECK (position >= 0),
    tx_hash      text          NOT NULL,
    token        text          NOT NULL,
    operator     text          NOT NULL,
    from_address text          NOT NULL,
    to_address   text          NOT NULL,
    token_id     numeric(78,0) NOT NULL,
    value        numeric(78,0) NOT NULL,
    PRIMARY KEY (chain_id, block_hash, log_index, position)
);
CREATE INDEX chain_erc1155_transfers_token_block
    ON public.chain_erc1155_transfers (chain_id, token, block_number);

-- Rows whose balance returns to 0 are KEPT (as in token_balances); a holder with no row has 0.
-- The zero address never has a row (mints come from it, burns go to it).
CREATE TABLE public.chain_erc1155_balances (
    chain_id      bigint        NOT NULL,
    token         text          NOT NULL,
    token_id      numeric(78,0) NOT NULL,
    holder        text          NOT NULL,
    balance       numeric(78,0) NOT NULL,
    updated_block bigint        NOT NULL,
    PRIMARY KEY (chain_id, token, token_id, holder)
);
-- Holders of an id, highest first; and everything a wallet holds.
CREATE INDEX chain_erc1155_balances_top
    ON public.chain_erc1155_balances (chain_id, token, token_id, balance DESC);
CREATE INDEX chain_erc1155_balances_holder
    ON public.chain_erc1155_balances (chain_id, holder);

-- Minted minus burned per id (Σ of the id's balances, kept so it is one read).
CREATE TABLE public.chain_erc1155_supply (
    chain_id      bigint        NOT NULL,
    token         text          NOT NULL,
    token_id      numeric(78,0) NOT NULL,
    supply        numeric(78,0) NOT NULL,
    updated_block bigint        NOT NULL,
    PRIMARY KEY (chain_id, token, token_id)
);

DO $$
DECLARE t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['chain_erc1155_transfers', 'chain_erc1155_balances', 'chain_erc1155_supply']
    LOOP
        EXECUTE format('ALTER TABLE public.%I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('CREATE POLICY %I ON public.%I FOR SELECT TO anon, authenticated USING (true)',
                       t || '_public_read', t);
    END LOOP;
END
$$;

-- chain_token_request accepts the new standard (otherwise as in 20261201095100).
CREATE OR REPLACE FUNCTION public.chain_token_request(
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
        IF p_standard IS NULL OR p_standard NOT IN ('erc20', 'erc721', 'erc1155') THEN
            RAISE EXCEPTION 'standard "%" of token % is not erc20, erc721 or erc1155', p_standard, v_address
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

-- Chain index: tracked tokens, Transfer logs, ERC-20 balances, ERC-721 owners, recent block
-- hashes and one checkpoint per chain. Written only by the worker's indexer (the table owner);
-- readable by everyone (public chain data). Addresses are lowercase 0x hex text; amounts are
-- uint256 as numeric(78,0).

CREATE TABLE public.chain_tokens (
    chain_id    bigint  NOT NULL,
    address     text    NOT NULL CHECK (address ~ '^0x[0-9a-f]{40}$'),
    standard    text    NOT NULL CHECK (standard IN ('erc20', 'erc721')),
    decimals    int     NULL,
    symbol      text    NULL,
    name        text    NULL,
    start_block bigint  NOT NULL DEFAULT 0,
    PRIMARY KEY (chain_id, address)
);

CREATE TABLE public.chain_transfers (
    chain_id     bigint        NOT NULL,
    block_number bigint        NOT NULL,
    block_hash   text          NOT NULL,
    log_index    int           NOT NULL,
    tx_hash      text          NOT NULL,
    token        text          NOT NULL,
    from_address text          NOT NULL,
    to_address   text          NOT NULL,
    -- ERC-20 amount; 1 for ERC-721.
    value        numeric(78,0) NOT NULL,
    -- ERC-721 only.
    token_id     numeric(78,0) NULL,
    PRIMARY KEY (chain_id, block_hash, log_index)
);
CREATE INDEX chain_transfers_token_block ON public.chain_transfers (chain_id, token, block_number);

-- Logs of tracked tokens carrying the Transfer topic that do not decode as a Transfer of the
-- token's configured standard (wrong topic count, short data...): they change no balance and
-- are kept here with the reason. Written in the batch transaction; reorg undo removes those of
-- dropped blocks.
CREATE TABLE public.chain_rejected_logs (
    chain_id     bigint      NOT NULL,
    block_number bigint      NOT NULL,
    block_hash   text        NOT NULL,
    log_index    int         NOT NULL,
    tx_hash      text        NOT NULL,
    token        text        NOT NULL,
    topics       text[]      NOT NULL,
    data         text        NOT NULL,
    reason       text        NOT NULL,
    detected_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (chain_id, block_hash, log_index)
);
CREATE INDEX chain_rejected_logs_block ON public.chain_rejected_logs (chain_id, block_number);

-- Rows whose balance went back to 0 are KEPT (balance = 0), so "has this address ever held T"
-- stays answerable and reorg undo never has to recreate rows.
CREATE TABLE public.token_balances (
    chain_id      bigint        NOT NULL,
    token         text          NOT NULL,
    holder        text          NOT NULL,
    balance       numeric(78,0) NOT NULL,
    updated_block bigint        NOT NULL,
    PRIMARY KEY (chain_id, token, holder)
);
CREATE INDEX token_balances_top ON public.token_balances (chain_id, token, balance DESC);

-- One row per existing token id; burned tokens have no row.
CREATE TABLE public.nft_owners (
    chain_id      bigint        NOT NULL,
    token         text          NOT NULL,
    token_id      numeric(78,0) NOT NULL,
    owner         text          NOT NULL,
    updated_block bigint        NOT NULL,
    PRIMARY KEY (chain_id, token, token_id)
);
CREATE INDEX nft_owners_owner ON public.nft_owners (chain_id, owner);

-- Recent block hashes (the reorg window) plus the last block of each backfill batch.
CREATE TABLE public.chain_blocks (
    chain_id    bigint NOT NULL,
    number      bigint NOT NULL,
    hash        text   NOT NULL,
    parent_hash text   NOT NULL,
    PRIMARY KEY (chain_id, number)
);

CREATE TABLE public.chain_checkpoints (
    chain_id        bigint      PRIMARY KEY,
    -- Last block whose data is committed.
    block_number    bigint      NOT NULL,
    block_hash      text        NOT NULL,
    -- Highest committed block considered final (block_number - reorg_depth).
    finalized_block bigint      NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT pg_catalog.now(),
    CHECK (finalized_block <= block_number)
);

-- Internal: a chain whose indexer stopped on a fault it must not resolve by itself (a reorg
-- deeper than reorg_depth). While a row exists no replica indexes that chain; an operator
-- deletes it after repairing the index (see docs/readme/chain.md).
CREATE TABLE public.chain_indexer_faults (
    chain_id    bigint      PRIMARY KEY,
    reason      text        NOT NULL,
    at_block    bigint      NOT NULL,
    detected_at timestamptz NOT NULL DEFAULT pg_catalog.now()
);

DO $$
DECLARE t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['chain_tokens', 'chain_transfers', 'token_balances', 'nft_owners',
                             'chain_blocks', 'chain_checkpoints', 'chain_indexer_faults',
                             'chain_rejected_logs']
    LOOP
        EXECUTE format('ALTER TABLE public.%I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('CREATE POLICY %I ON public.%I FOR SELECT TO anon, authenticated USING (true)',
                       t || '_public_read', t);
        EXECUTE format('GRANT SELECT ON public.%I TO anon, authenticated', t);
    END LOOP;
END
$$;

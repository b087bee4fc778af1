-- Balance at any block from the stored transfers (ChainStore::balance_at, min_balance_between,
-- holders_at_block): one index per side of a transfer, so a holder's incoming and outgoing
-- transfers up to a block are two index range scans (value included: index-only).
CREATE INDEX chain_transfers_to_history
    ON public.chain_transfers (chain_id, token, to_address, block_number) INCLUDE (value);
CREATE INDEX chain_transfers_from_history
    ON public.chain_transfers (chain_id, token, from_address, block_number) INCLUDE (value);

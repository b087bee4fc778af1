-- Backfill speed (issue 14): fewer and narrower index updates per stored transfer.
--
-- * The primary key becomes (chain_id, block_number, log_index): a log's index is unique within
--   its block, and the index holds one branch of a block at a time (a reorg undo deletes the
--   dropped blocks' rows before the new branch is written), so the key is as unique as
--   (chain_id, block_hash, log_index) was — stricter even: a reply mixing two branches of one
--   block can no longer store both. Its entries are 16 bytes of integers instead of a
--   66-character hash, and it serves the block-range reads (reorg undo: `block_number >= fork`).
-- * chain_transfers_token_block (chain_id, token, block_number) is dropped: every reader of a
--   token's transfers up to or from a block uses the history indexes
--   (20261201095200_chain_history.sql: (chain_id, token, to_address|from_address, block_number)
--   INCLUDE (value)), which have the same prefix, and a token's removal deletes by that prefix.
--
-- Each stored transfer now updates three indexes instead of four.
ALTER TABLE public.chain_transfers DROP CONSTRAINT chain_transfers_pkey;
ALTER TABLE public.chain_transfers
    ADD CONSTRAINT chain_transfers_pkey PRIMARY KEY (chain_id, block_number, log_index);
DROP INDEX public.chain_transfers_token_block;

-- The `held` leaf: at least N whole tokens continuously over a window, from `chain_transfers`
-- (the lowest balance over the window, as ChainStore::min_balance_between reads it, over the two
-- history indexes of 20261201095200_chain_history.sql).
--
--   {"held": {"chain_id": C, "token": "0x…", "min": "5", "since_block": B}}
--       the balance at the start of block B (the end of B − 1) and after every transfer from B
--       through the last indexed block;
--   {"held": {"chain_id": C, "token": "0x…", "min": "5", "for_secs": S}}
--       the same from the block that was the head S seconds ago.
--
-- The chain tables hold no block timestamps, so durations use a clock of head readings:
-- public.tw_access_block_clock keeps (chain, head block, when it was read), sampled from the head
-- watcher's writes to tw_access_chain_heads (a trigger; at most one sample per chain every 30 s).
-- For S seconds the window starts after the newest sample read at least S seconds ago: that
-- block was mined no later than now − S, so the window covers at least S seconds (at most one
-- sampling interval more: a stricter check, never a laxer one). With no sample that old yet
-- (a worker that has watched the chain for less than S) the leaf is `stale`: we don't know
-- which block to start from, and "don't know" must not read as "held".
-- The wallets of a user count together (the minimum of their summed balance: moving tokens
-- between one's own wallets is no dip) unless the rule says per wallet (the best wallet's
-- own minimum). The held branches of validation and evaluation (tw_access_check_node,
-- tw_access_eval_node) are in 20261202070000_access_rule_tree.sql, with every other leaf kind.

CREATE TABLE public.tw_access_block_clock (
    chain_id     bigint NOT NULL,
    observed_at  timestamptz NOT NULL,
    head         bigint NOT NULL,
    PRIMARY KEY (chain_id, observed_at)
);
ALTER TABLE public.tw_access_block_clock ENABLE ROW LEVEL SECURITY;

-- Samples a head reading into the clock unless the chain has a sample less than 30 s old.
CREATE FUNCTION public.tw_access_sample_head()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT EXISTS (SELECT FROM public.tw_access_block_clock c
                   WHERE c.chain_id = NEW.chain_id
                     AND c.observed_at > NEW.observed_at - interval '30 seconds') THEN
        INSERT INTO public.tw_access_block_clock (chain_id, observed_at, head)
        VALUES (NEW.chain_id, NEW.observed_at, NEW.head)
        ON CONFLICT DO NOTHING;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER tw_access_chain_heads_clock
    AFTER INSERT OR UPDATE ON public.tw_access_chain_heads
    FOR EACH ROW EXECUTE FUNCTION public.tw_access_sample_head();

-- The first block of a held leaf's window: since_block, or the block after the newest head
-- sample of p_chain read at least for_secs ago (NULL when there is none).
CREATE FUNCTION public.tw_access_held_from(p_chain bigint, p_body jsonb)
RETURNS bigint
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN p_body ? 'since_block' THEN (p_body ->> 'since_block')::numeric::bigint
        ELSE (SELECT c.head + 1 FROM public.tw_access_block_clock c
              WHERE c.chain_id = p_chain
                AND c.observed_at <= pg_catalog.now() - pg_catalog.make_interval(secs => (p_body ->> 'for_secs')::numeric::double precision)
              ORDER BY c.observed_at DESC LIMIT 1) END;
$$;

-- The lowest summed balance of p_wallets in token p_token over blocks p_from..p_to: the balance
-- at the end of p_from − 1, then after each transfer in chain order (a transfer between two of
-- the wallets nets to nothing). Four index-only range scans per wallet over the history indexes.
CREATE FUNCTION public.tw_access_min_held(p_chain bigint, p_token text, p_wallets text[], p_from bigint, p_to bigint)
RETURNS numeric
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    WITH base AS (
        SELECT coalesce((SELECT pg_catalog.sum(t.value) FROM public.chain_transfers t
                  WHERE t.chain_id = p_chain AND t.token = p_token AND t.to_address = ANY (p_wallets)
                    AND t.block_number < p_from), 0)
             - coalesce((SELECT pg_catalog.sum(t.value) FROM public.chain_transfers t
                  WHERE t.chain_id = p_chain AND t.token = p_token AND t.from_address = ANY (p_wallets)
                    AND t.block_number < p_from), 0) AS b
    ), moves AS (
        SELECT t.block_number, t.log_index, t.value AS d FROM public.chain_transfers t
         WHERE t.chain_id = p_chain AND t.token = p_token AND t.to_address = ANY (p_wallets)
           AND t.block_number BETWEEN p_from AND p_to
        UNION ALL
        SELECT t.block_number, t.log_index, -t.value FROM public.chain_transfers t
         WHERE t.chain_id = p_chain AND t.token = p_token AND t.from_address = ANY (p_wallets)
           AND t.block_number BETWEEN p_from AND p_to
    ), net AS (
        SELECT m.block_number, m.log_index, pg_catalog.sum(m.d) AS d
        FROM moves m GROUP BY m.block_number, m.log_index
    ), running AS (
        SELECT pg_catalog.sum(n.d) OVER (ORDER BY n.block_number, n.log_index ROWS UNBOUNDED PRECEDING) AS r
        FROM net n
    )
    SELECT (SELECT base.b FROM base) + LEAST(0, coalesce((SELECT pg_catalog.min(running.r) FROM running), 0));
$$;

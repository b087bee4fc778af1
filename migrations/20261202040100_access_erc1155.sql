-- Access rules: an `erc1155` leaf, on the ERC-1155 per-id balances of the chain index
-- (20261202040000_chain_erc1155.sql):
--   {"erc1155": {"chain_id": C, "token": "0x…", "token_id": "7", "min": "5"}}
--   units of one id (ERC-1155 ids have no decimals), summed over the user's wallets (or per
--   wallet), from chain_erc1155_balances.
-- Its validation and evaluation branches are in 20261202070000_access_rule_tree.sql (with every
-- leaf kind). Here: tw_access_default_condition (from 20261201095600_access_rules.sql) without a
-- default for an ERC-1155 token, which needs a rule naming an id.

CREATE OR REPLACE FUNCTION public.tw_access_default_condition(p_chain bigint, p_token text)
RETURNS jsonb
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE t.standard
        -- An ERC-1155 token has no "one of the token" without an id: no default, a rule is needed.
        WHEN 'erc1155' THEN NULL
        WHEN 'erc721' THEN pg_catalog.jsonb_build_object('erc721', pg_catalog.jsonb_build_object(
            'chain_id', t.chain_id, 'token', t.address, 'min_count', 1))
        ELSE pg_catalog.jsonb_build_object('erc20', pg_catalog.jsonb_build_object(
            'chain_id', t.chain_id, 'token', t.address, 'min', '1')) END
    FROM public.chain_tokens t
    WHERE t.chain_id = p_chain AND t.address = pg_catalog.lower(p_token);
$$;

-- Supabase compatibility: the same migrations run on Supabase and on plain Postgres.
--
-- On Supabase the roles anon / authenticated / service_role, the schema `auth` and auth.uid()
-- already exist and belong to other roles; the migration owner (`postgres`) is NOT a superuser
-- there (NOSUPERUSER CREATEDB CREATEROLE LOGIN REPLICATION BYPASSRLS). So nothing here may touch
-- an object that exists: every statement is behind an existence check. A `CREATE ROLE … BYPASSRLS`
-- must not even be attempted when the role exists, because PostgreSQL 15 checks the privilege
-- (superuser) before it checks for a duplicate, and the duplicate_object handler never runs.
--
-- On plain Postgres they are created here, with auth.uid() reading the JWT claims the way
-- Supabase does (PostgREST sets `request.jwt.claims` per transaction).
--
-- This file was changed after its first release (it used to try CREATE ROLE and catch the
-- duplicate); `tokenwarden migrate` accepts the first release's checksum for it, see
-- src/infra/connect.rs.

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'anon') THEN
        CREATE ROLE anon NOLOGIN NOINHERIT;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'authenticated') THEN
        CREATE ROLE authenticated NOLOGIN NOINHERIT;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'service_role') THEN
        CREATE ROLE service_role NOLOGIN NOINHERIT BYPASSRLS;
    END IF;
END
$$;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = 'auth') THEN
        CREATE SCHEMA auth;
        GRANT USAGE ON SCHEMA auth TO anon, authenticated, service_role;
    END IF;
    IF NOT EXISTS (
        SELECT 1 FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = 'auth' AND p.proname = 'uid'
    ) THEN
        EXECUTE $fn$
            CREATE FUNCTION auth.uid() RETURNS uuid
            LANGUAGE sql STABLE
            SET search_path = pg_catalog, pg_temp
            AS $body$
                SELECT coalesce(
                    nullif(pg_catalog.current_setting('request.jwt.claim.sub', true), ''),
                    (nullif(pg_catalog.current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')
                )::uuid
            $body$
        $fn$;
        GRANT EXECUTE ON FUNCTION auth.uid() TO anon, authenticated, service_role;
    END IF;
END
$$;

-- Supabase grants this already (then this is a no-op for its owner); plain Postgres needs it.
GRANT USAGE ON SCHEMA public TO anon, authenticated, service_role;

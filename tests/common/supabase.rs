//! A Supabase-shaped database on the local PostgreSQL, so every SQL, RLS and privilege test runs
//! on both kinds of database users deploy to.
//!
//! Reproduced from Supabase's own published set-up (supabase/postgres
//! `migrations/db/init-scripts/00000000000000-initial-schema.sql`, `…-auth-schema.sql`,
//! `migrations/db/migrations/10000000000000_demote-postgres.sql`; supabase/auth
//! `20211202183645_update_auth_uid.up.sql`), written here from those facts:
//! - the migration owner is NOT a superuser: `NOSUPERUSER CREATEDB CREATEROLE LOGIN REPLICATION
//!   BYPASSRLS` (Supabase's demoted `postgres`; here the role `tw_sb_postgres`, because the local
//!   `postgres` must stay superuser to create the test databases);
//! - `anon`, `authenticated` (NOLOGIN NOINHERIT), `service_role` (NOLOGIN NOINHERIT BYPASSRLS)
//!   and `authenticator` (LOGIN NOINHERIT, member of the three) exist before any migration;
//! - the database belongs to `supabase_admin` (superuser); the owner has ALL on it and on
//!   schema `public`, which it does not own;
//! - schema `auth` belongs to `supabase_auth_admin` with `auth.uid()`, `auth.role()` and
//!   `auth.jwt()` in it; extensions live in schema `extensions`;
//! - default privileges grant ALL on every new table, sequence and function the owner creates
//!   in `public` to `anon`, `authenticated` and `service_role`.
//!
//! Roles are cluster-wide, so they are created once (idempotently, under an advisory lock)
//! and shared by every test; each test gets its own database.

use sqlx::PgPool;

/// The stand-in for Supabase's demoted `postgres` role: owner of the migrations.
pub const OWNER: &str = "tw_sb_postgres";

/// Login roles that are members of one API role each (INHERIT), as a PostgREST-like
/// connection or a leaked member credential would be. Used by privilege and hijack tests.
pub const MEMBERS: [(&str, &str); 3] = [
    ("anon", "tw_member_anon"),
    ("authenticated", "tw_member_authenticated"),
    ("service_role", "tw_member_service_role"),
];

const CLUSTER_SQL: &str = r#"
DO $$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'supabase_admin') THEN
    CREATE ROLE supabase_admin SUPERUSER CREATEDB CREATEROLE REPLICATION BYPASSRLS LOGIN;
  END IF;
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'supabase_auth_admin') THEN
    CREATE ROLE supabase_auth_admin NOINHERIT CREATEROLE LOGIN NOREPLICATION;
  END IF;
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'anon') THEN
    CREATE ROLE anon NOLOGIN NOINHERIT;
  END IF;
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'authenticated') THEN
    CREATE ROLE authenticated NOLOGIN NOINHERIT;
  END IF;
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'service_role') THEN
    CREATE ROLE service_role NOLOGIN NOINHERIT BYPASSRLS;
  END IF;
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'authenticator') THEN
    CREATE ROLE authenticator LOGIN NOINHERIT;
  END IF;
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'tw_sb_postgres') THEN
    CREATE ROLE tw_sb_postgres NOSUPERUSER CREATEDB CREATEROLE LOGIN REPLICATION BYPASSRLS;
  END IF;
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'tw_member_anon') THEN
    CREATE ROLE tw_member_anon LOGIN INHERIT IN ROLE anon;
  END IF;
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'tw_member_authenticated') THEN
    CREATE ROLE tw_member_authenticated LOGIN INHERIT IN ROLE authenticated;
  END IF;
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'tw_member_service_role') THEN
    CREATE ROLE tw_member_service_role LOGIN INHERIT IN ROLE service_role;
  END IF;
END $$;
GRANT anon, authenticated, service_role TO authenticator;
GRANT anon, authenticated, service_role TO tw_sb_postgres;
-- Attributes are reset every time: a hijack test that failed (on code without the fix) may have
-- made a member a superuser, and that must not leak into the next run.
ALTER ROLE tw_member_anon NOSUPERUSER NOCREATEROLE NOCREATEDB NOBYPASSRLS;
ALTER ROLE tw_member_authenticated NOSUPERUSER NOCREATEROLE NOCREATEDB NOBYPASSRLS;
ALTER ROLE tw_member_service_role NOSUPERUSER NOCREATEROLE NOCREATEDB NOBYPASSRLS;
ALTER ROLE tw_sb_postgres NOSUPERUSER CREATEDB CREATEROLE LOGIN REPLICATION BYPASSRLS;
"#;

/// Run as the superuser inside the new database, before any migration.
const DATABASE_SQL: &str = r#"
GRANT ALL ON DATABASE {db} TO tw_sb_postgres;
GRANT ALL ON SCHEMA public TO tw_sb_postgres;
GRANT USAGE ON SCHEMA public TO anon, authenticated, service_role;
CREATE SCHEMA extensions;
GRANT USAGE ON SCHEMA extensions TO tw_sb_postgres, anon, authenticated, service_role;
CREATE SCHEMA auth AUTHORIZATION supabase_auth_admin;
SET ROLE supabase_auth_admin;
CREATE FUNCTION auth.uid() RETURNS uuid LANGUAGE sql STABLE AS $$
  select coalesce(
    nullif(current_setting('request.jwt.claim.sub', true), ''),
    (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')
  )::uuid $$;
CREATE FUNCTION auth.role() RETURNS text LANGUAGE sql STABLE AS $$
  select coalesce(
    nullif(current_setting('request.jwt.claim.role', true), ''),
    (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'role')
  )::text $$;
CREATE FUNCTION auth.jwt() RETURNS jsonb LANGUAGE sql STABLE AS $$
  select coalesce(
    nullif(current_setting('request.jwt.claim', true), ''),
    nullif(current_setting('request.jwt.claims', true), '')
  )::jsonb $$;
GRANT USAGE ON SCHEMA auth TO anon, authenticated, service_role;
RESET ROLE;
ALTER DEFAULT PRIVILEGES FOR ROLE tw_sb_postgres IN SCHEMA public
  GRANT ALL ON TABLES TO anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES FOR ROLE tw_sb_postgres IN SCHEMA public
  GRANT ALL ON FUNCTIONS TO anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES FOR ROLE tw_sb_postgres IN SCHEMA public
  GRANT ALL ON SEQUENCES TO anon, authenticated, service_role;
"#;

/// Creates the cluster-wide roles (both kinds of test database use the member roles).
pub async fn ensure_roles(admin: &PgPool) {
    let mut conn = admin.acquire().await.expect("admin connection");
    // Concurrent CREATE ROLE of the same name fails; one test at a time does this.
    sqlx::query("SELECT pg_advisory_lock(727272)")
        .execute(&mut *conn)
        .await
        .expect("advisory lock");
    let result = sqlx::raw_sql(CLUSTER_SQL).execute(&mut *conn).await;
    sqlx::query("SELECT pg_advisory_unlock(727272)")
        .execute(&mut *conn)
        .await
        .expect("advisory unlock");
    result.expect("create the Supabase-shaped roles");
}

/// `CREATE DATABASE` for a Supabase-shaped database (owned by `supabase_admin`).
pub fn create_database_sql(db: &str) -> String {
    format!("CREATE DATABASE {db} OWNER supabase_admin")
}

/// Prepares a new database the way a fresh Supabase project is before the user's migrations.
pub async fn prepare_database(db_pool_as_superuser: &PgPool, db: &str) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(DATABASE_SQL.replace("{db}", db)))
        .execute(db_pool_as_superuser)
        .await
        .expect("prepare the Supabase-shaped database");
}

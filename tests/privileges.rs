//! The privilege model as a whole, on a plain and on a Supabase-shaped database:
//! - the catalog equals the declared matrix (`security/privileges.txt`) for every object in
//!   `public`, for each API role, for PUBLIC and for a login role that is a member of each role;
//! - every table has Row Level Security on; every listed function pins its `search_path`;
//! - the attacks found in review fail with "permission denied";
//! - no SECURITY DEFINER function can be made to run a caller's code as its owner by types or
//!   tables planted in `pg_temp`.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use sqlx::{PgPool, Row};

use common::supabase::MEMBERS;
use common::{DbKind, TestEnv};

const TABLE_PRIVS: [&str; 7] = [
    "SELECT",
    "INSERT",
    "UPDATE",
    "DELETE",
    "TRUNCATE",
    "REFERENCES",
    "TRIGGER",
];
const SEQUENCE_PRIVS: [&str; 3] = ["USAGE", "SELECT", "UPDATE"];
const GRANTEES: [&str; 4] = ["anon", "authenticated", "service_role", "public"];

/// One line of the matrix: kind, object, privileges per grantee (in `GRANTEES` order).
#[derive(Debug)]
struct Declared {
    kind: String,
    grants: [BTreeSet<String>; 4],
}

fn matrix() -> BTreeMap<String, Declared> {
    let path = common::repo_root().join("security/privileges.txt");
    let text = std::fs::read_to_string(&path).expect("read security/privileges.txt");
    let mut out = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            cols.len(),
            6,
            "security/privileges.txt:{}: six columns",
            n + 1
        );
        let set = |c: &str| -> BTreeSet<String> {
            if c == "-" {
                BTreeSet::new()
            } else {
                c.split(',').map(str::to_string).collect()
            }
        };
        let prev = out.insert(
            cols[1].to_string(),
            Declared {
                kind: cols[0].to_string(),
                grants: [set(cols[2]), set(cols[3]), set(cols[4]), set(cols[5])],
            },
        );
        assert!(prev.is_none(), "{} is listed twice", cols[1]);
    }
    out
}

/// Every relation and function in `public` that is not part of an extension:
/// (name as the matrix writes it, kind, oid).
async fn catalog_objects(pool: &PgPool) -> Vec<(String, String, i64)> {
    sqlx::query(
        "SELECT 'public.' || c.relname AS name,
                CASE c.relkind WHEN 'S' THEN 'sequence' WHEN 'v' THEN 'view' WHEN 'm' THEN 'view'
                               ELSE 'table' END AS kind,
                c.oid::bigint AS oid
           FROM pg_class c
          WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r','p','v','m','S','f')
            AND NOT EXISTS (SELECT 1 FROM pg_depend d
                             WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                               AND d.deptype = 'e')
         UNION ALL
         SELECT 'public.' || p.proname || '(' || replace(oidvectortypes(p.proargtypes), ' ', '') || ')',
                'function', p.oid::bigint
           FROM pg_proc p
          WHERE p.pronamespace = 'public'::regnamespace
            AND NOT EXISTS (SELECT 1 FROM pg_depend d
                             WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid
                               AND d.deptype = 'e')
          ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .expect("read the catalog")
    .into_iter()
    .map(|r| (r.get("name"), r.get("kind"), r.get("oid")))
    .collect()
}

/// What `role` may do with the object, as the catalog answers (membership and PUBLIC included).
async fn effective(pool: &PgPool, role: &str, kind: &str, oid: i64) -> BTreeSet<String> {
    let (privs, func): (&[&str], &str) = match kind {
        "table" | "view" => (&TABLE_PRIVS, "has_table_privilege"),
        "sequence" => (&SEQUENCE_PRIVS, "has_sequence_privilege"),
        _ => (&["EXECUTE"], "has_function_privilege"),
    };
    let mut out = BTreeSet::new();
    for p in privs {
        let q = format!("SELECT {func}($1, $2::oid, $3)");
        let ok: bool = sqlx::query_scalar(sqlx::AssertSqlSafe(q))
            .bind(role)
            .bind(oid)
            .bind(*p)
            .fetch_one(pool)
            .await
            .unwrap_or_else(|e| panic!("{func}({role}, {oid}, {p}): {e}"));
        if ok {
            out.insert(p.to_string());
        }
    }
    out
}

async fn check_matrix(kind: DbKind) {
    let env = TestEnv::on(kind).await;
    let declared = matrix();
    let objects = catalog_objects(&env.pool).await;
    let mut problems = Vec::new();
    let found: BTreeSet<&str> = objects.iter().map(|(n, _, _)| n.as_str()).collect();
    for name in declared.keys() {
        if !found.contains(name.as_str()) {
            problems.push(format!(
                "{name}: listed in the matrix but not in the database"
            ));
        }
    }
    for (name, obj_kind, oid) in &objects {
        let Some(decl) = declared.get(name) else {
            problems.push(format!(
                "{name} ({obj_kind}): not in security/privileges.txt; every object needs a line"
            ));
            continue;
        };
        if &decl.kind != obj_kind {
            problems.push(format!(
                "{name}: is a {obj_kind}, the matrix says {}",
                decl.kind
            ));
        }
        let public = &decl.grants[3];
        for (i, grantee) in GRANTEES.iter().enumerate() {
            let want: BTreeSet<String> = decl.grants[i].union(public).cloned().collect();
            let got = effective(&env.pool, grantee, obj_kind, *oid).await;
            if got != want {
                problems.push(format!(
                    "{name}: {grantee} may {got:?}, the matrix says {want:?}"
                ));
            }
        }
        for (role, member) in MEMBERS {
            let i = GRANTEES.iter().position(|g| *g == role).expect("role");
            let want: BTreeSet<String> = decl.grants[i].union(public).cloned().collect();
            let got = effective(&env.pool, member, obj_kind, *oid).await;
            if got != want {
                problems.push(format!(
                    "{name}: {member} (member of {role}) may {got:?}, the matrix says {want:?}"
                ));
            }
        }
    }
    let no_rls: Vec<String> = sqlx::query_scalar(
        "SELECT relname::text FROM pg_class
          WHERE relnamespace = 'public'::regnamespace AND relkind IN ('r','p')
            AND NOT relrowsecurity ORDER BY 1",
    )
    .fetch_all(&env.pool)
    .await
    .expect("rls");
    for t in no_rls {
        problems.push(format!("public.{t}: Row Level Security is off"));
    }
    let loose: Vec<String> = sqlx::query_scalar(
        "SELECT p.oid::regprocedure::text FROM pg_proc p
          WHERE p.pronamespace = 'public'::regnamespace
            AND NOT coalesce('search_path=pg_catalog, pg_temp' = ANY (p.proconfig), false)
          ORDER BY 1",
    )
    .fetch_all(&env.pool)
    .await
    .expect("proconfig");
    for f in loose {
        problems.push(format!(
            "{f}: search_path is not pinned to `pg_catalog, pg_temp`"
        ));
    }
    assert!(
        problems.is_empty(),
        "{kind:?} database differs from security/privileges.txt:\n  {}",
        problems.join("\n  ")
    );
}

#[tokio::test]
async fn plain_database_matches_the_privilege_matrix() {
    check_matrix(DbKind::Plain).await;
}

#[tokio::test]
async fn supabase_database_matches_the_privilege_matrix() {
    check_matrix(DbKind::Supabase).await;
}

/// Runs `sql` as `member` and returns the SQLSTATE it failed with (None if it succeeded).
async fn sqlstate_as(env: &TestEnv, member: &str, sql: &str) -> Option<String> {
    let pool = env.pool_as(member).await;
    let r = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
        .execute(&pool)
        .await;
    pool.close().await;
    match r {
        Ok(_) => None,
        Err(sqlx::Error::Database(e)) => Some(e.code().map(|c| c.to_string()).unwrap_or_default()),
        Err(e) => panic!("{member}: {sql}: {e}"),
    }
}

/// The attacks the database review found, each as the role that ran it.
#[tokio::test]
async fn reviewed_attacks_are_denied_on_both_databases() {
    let attacks: &[(&str, &str)] = &[
        (
            "tw_member_anon",
            "SELECT * FROM public.detect_high_frequency_requests(gen_random_uuid(), interval '1 hour', 1)",
        ),
        ("tw_member_authenticated", "TRUNCATE public.snapshots"),
        (
            "tw_member_authenticated",
            "TRUNCATE public.snapshot_holders",
        ),
        ("tw_member_authenticated", "TRUNCATE public.token_balances"),
        ("tw_member_authenticated", "TRUNCATE public.chain_transfers"),
        ("tw_member_authenticated", "TRUNCATE public.chain_tokens"),
        (
            "tw_member_anon",
            "CREATE TRIGGER wipe AFTER UPDATE ON public.snapshots FOR EACH ROW \
             EXECUTE FUNCTION public.tw_snapshots_delete_holders()",
        ),
        (
            "tw_member_authenticated",
            "SELECT setval('public.token_balance_history_id_seq', 9223372036854775807)",
        ),
        (
            "tw_member_authenticated",
            "SELECT setval('public.token_anomalies_id_seq', 9223372036854775807)",
        ),
        (
            "tw_member_service_role",
            "INSERT INTO public.snapshot_holders VALUES (gen_random_uuid(), '0x00', 1)",
        ),
        ("tw_member_service_role", "DELETE FROM public.chain_tokens"),
        (
            "tw_member_service_role",
            "SELECT * FROM public.tw_ledger_apply_core(ARRAY[]::uuid[], ARRAY[]::text[], \
             ARRAY[]::uuid[], ARRAY[]::bigint[], ARRAY[]::text[], ARRAY[]::uuid[], \
             ARRAY[]::integer[], ARRAY[]::jsonb[], 4096, 86400)",
        ),
        (
            "tw_member_authenticated",
            "SELECT * FROM public.ledger_requests",
        ),
        ("tw_member_anon", "SELECT * FROM public.credit_accounts"),
    ];
    for kind in DbKind::ALL {
        let env = TestEnv::on(kind).await;
        for (member, sql) in attacks {
            let state = sqlstate_as(&env, member, sql).await;
            assert_eq!(
                state.as_deref(),
                Some("42501"),
                "{kind:?}: {member} ran `{sql}` (expected permission denied)"
            );
        }
    }
}

/// Argument list for calling `f` with its argument types, every literal cast with a
/// schema-qualified type so the caller's own statement does not use the planted types.
fn call_args(types: &str, id: &str) -> String {
    types
        .split(',')
        .filter(|t| !t.trim().is_empty())
        .map(|t| {
            let t = t.trim();
            let (base, array) = match t.strip_suffix("[]") {
                Some(b) => (b, true),
                None => (t, false),
            };
            let lit = match base {
                "uuid" => format!("'{id}'::pg_catalog.uuid"),
                "text" => "'1'::pg_catalog.text".to_string(),
                "bigint" => "1::pg_catalog.int8".to_string(),
                "integer" => "1::pg_catalog.int4".to_string(),
                "jsonb" => "'{}'::pg_catalog.jsonb".to_string(),
                "interval" => "'1 minute'::pg_catalog.interval".to_string(),
                "boolean" => "false::pg_catalog.bool".to_string(),
                "tstzrange" => "'[2026-01-01,2099-01-01)'::pg_catalog.tstzrange".to_string(),
                other => panic!("no test literal for argument type {other}"),
            };
            if array { format!("ARRAY[{lit}]") } else { lit }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

const PLANT: &str = r#"
CREATE TEMP SEQUENCE tw_hijacked;
GRANT ALL ON SEQUENCE pg_temp.tw_hijacked TO PUBLIC;
CREATE FUNCTION pg_temp.evil(x pg_catalog.text) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    IF pg_catalog."current_user"() <> pg_catalog."session_user"() THEN
        PERFORM pg_catalog.nextval('pg_temp.tw_hijacked');
        BEGIN
            EXECUTE pg_catalog.format('ALTER ROLE %I SUPERUSER', pg_catalog."session_user"());
        EXCEPTION WHEN OTHERS THEN NULL;
        END;
    END IF;
    RETURN true;
END $$;
CREATE DOMAIN pg_temp.text AS pg_catalog.text CHECK (pg_temp.evil(VALUE));
CREATE DOMAIN pg_temp.uuid AS pg_catalog.uuid CHECK (pg_temp.evil(VALUE::pg_catalog.text));
CREATE DOMAIN pg_temp.jsonb AS pg_catalog.jsonb CHECK (pg_temp.evil(VALUE::pg_catalog.text));
CREATE DOMAIN pg_temp.int8 AS pg_catalog.int8 CHECK (pg_temp.evil(VALUE::pg_catalog.text));
CREATE DOMAIN pg_temp.int4 AS pg_catalog.int4 CHECK (pg_temp.evil(VALUE::pg_catalog.text));
CREATE DOMAIN pg_temp.timestamptz AS pg_catalog.timestamptz
    CHECK (pg_temp.evil(VALUE::pg_catalog.text));
CREATE DOMAIN pg_temp.citext AS pg_catalog.text CHECK (pg_temp.evil(VALUE));
"#;

/// For every function the role may execute, a member plants shadowing types and tables in
/// `pg_temp` and calls it (once with a fresh id, once with a complete snapshot's id); no planted
/// code may run as the owner, and the member's attributes stay as they were.
#[tokio::test]
async fn pg_temp_shadows_cannot_run_code_as_a_definer_function_owner() {
    for kind in DbKind::ALL {
        let env = TestEnv::on(kind).await;
        let snapshot = uuid::Uuid::new_v4();
        sqlx::query(
            "INSERT INTO public.snapshots (id, source, chain, token, block_height, decimals,
                                           holder_count, status, completed_at)
             VALUES ($1, 'index', '1', '0x1111111111111111111111111111111111111111', 1, 0, 1,
                     'complete', now())",
        )
        .bind(snapshot)
        .execute(&env.pool)
        .await
        .expect("insert a complete snapshot");
        sqlx::query(
            "INSERT INTO public.snapshot_holders VALUES ($1, '0x1111111111111111111111111111111111111111', 5)",
        )
        .bind(snapshot)
        .execute(&env.pool)
        .await
        .expect("insert a holder");
        let tables: Vec<String> = sqlx::query_scalar(
            "SELECT relname::text FROM pg_class
              WHERE relnamespace = 'public'::regnamespace AND relkind = 'r'",
        )
        .fetch_all(&env.pool)
        .await
        .expect("tables");
        for (role, member) in MEMBERS {
            let functions: Vec<(String, String)> = sqlx::query_as(
                "SELECT 'public.' || quote_ident(p.proname), oidvectortypes(p.proargtypes)
                   FROM pg_proc p
                  WHERE p.pronamespace = 'public'::regnamespace AND p.prokind = 'f'
                    AND p.prorettype <> 'trigger'::regtype
                    AND has_function_privilege($1, p.oid, 'EXECUTE')",
            )
            .bind(role)
            .fetch_all(&env.pool)
            .await
            .expect("executable functions");
            assert!(
                role != "service_role" || functions.len() >= 5,
                "{kind:?}: service_role should execute the ledger door"
            );
            let pool = env.pool_as(member).await;
            let mut conn = pool.acquire().await.expect("member connection");
            sqlx::raw_sql(PLANT)
                .execute(&mut *conn)
                .await
                .unwrap_or_else(|e| panic!("{kind:?} {member}: plant: {e}"));
            for t in &tables {
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                    "CREATE TEMP TABLE {t} (x pg_catalog.int4)"
                )))
                .execute(&mut *conn)
                .await
                .unwrap_or_else(|e| panic!("plant table {t}: {e}"));
            }
            for (f, types) in &functions {
                for id in [uuid::Uuid::new_v4(), snapshot] {
                    let q = format!("SELECT {f}({})", call_args(types, &id.to_string()));
                    // Business errors are fine; only what the planted code did matters.
                    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(q))
                        .execute(&mut *conn)
                        .await;
                }
                let ran: i64 = sqlx::query_scalar(
                    "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM pg_temp.tw_hijacked",
                )
                .fetch_one(&mut *conn)
                .await
                .expect("read the hijack counter");
                assert_eq!(
                    ran, 0,
                    "{kind:?}: calling {f}({types}) as {member} ran the planted code as its owner"
                );
            }
            drop(conn);
            pool.close().await;
            let superuser: bool =
                sqlx::query_scalar("SELECT rolsuper FROM pg_roles WHERE rolname = $1")
                    .bind(member)
                    .fetch_one(&env.pool)
                    .await
                    .expect("role attributes");
            assert!(!superuser, "{kind:?}: {member} became superuser");
        }
    }
}

fn run_privileges_py(args: &[&str]) -> (bool, String) {
    let root = common::repo_root();
    let out = std::process::Command::new("python3")
        .arg(root.join("scripts/privileges.py"))
        .args(args)
        .current_dir(&root)
        .output()
        .expect("python3 runs scripts/privileges.py (install python3)");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The newest generated privileges migration is what the matrix generates today, so a matrix
/// change without a new migration fails here (and its database check fails in the tests above).
#[test]
fn the_newest_privileges_migration_is_generated_from_the_matrix() {
    let dir = common::repo_root().join("migrations");
    let mut generated: Vec<_> = std::fs::read_dir(&dir)
        .expect("read migrations/")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with("_privileges.sql"))
        .collect();
    generated.sort();
    let newest = generated.last().expect("a *_privileges.sql migration");
    let on_disk = std::fs::read_to_string(dir.join(newest)).expect("read migration");
    let (ok, sql) = run_privileges_py(&["sql"]);
    assert!(ok, "{sql}");
    assert_eq!(
        on_disk, sql,
        "migrations/{newest} differs from `scripts/privileges.py sql`: write the matrix change \
         as a new migration: scripts/privileges.py sql > migrations/<timestamp>_privileges.sql"
    );
}

#[test]
fn the_security_tables_in_the_docs_are_generated_from_the_matrix() {
    for doc in ["README.md", "docs/security.md"] {
        let (ok, text) = run_privileges_py(&["check-docs", doc]);
        assert!(ok, "{text}");
    }
}

/// The ledger's rules live outside `public`, in schema `ledger_rules`, without a pinned
/// search_path (so they are inlined): no API role, no member of one and not PUBLIC may use the
/// schema or execute its functions, and each has a SQL-standard body (bound when created, never
/// looked up through a caller's search_path).
#[tokio::test]
async fn the_private_ledger_rules_schema_is_closed_to_the_api_roles() {
    for kind in DbKind::ALL {
        let env = TestEnv::on(kind).await;
        let functions: Vec<(String, bool)> = sqlx::query_as(
            "SELECT p.oid::regprocedure::text, p.prosqlbody IS NOT NULL
               FROM pg_proc p WHERE p.pronamespace = 'ledger_rules'::regnamespace",
        )
        .fetch_all(&env.pool)
        .await
        .expect("list ledger_rules functions");
        assert!(functions.len() >= 5, "{kind:?}: {functions:?}");
        for (f, standard_body) in &functions {
            assert!(standard_body, "{kind:?}: {f} has no SQL-standard body");
        }
        let mut who: Vec<&str> = GRANTEES.to_vec();
        who.extend(MEMBERS.iter().map(|(_, m)| *m));
        for role in who {
            let usage: bool =
                sqlx::query_scalar("SELECT has_schema_privilege($1, 'ledger_rules', 'USAGE')")
                    .bind(role)
                    .fetch_one(&env.pool)
                    .await
                    .expect("has_schema_privilege");
            assert!(!usage, "{kind:?}: {role} has USAGE on schema ledger_rules");
            for (f, _) in &functions {
                let exec: bool =
                    sqlx::query_scalar("SELECT has_function_privilege($1, $2, 'EXECUTE')")
                        .bind(role)
                        .bind(f)
                        .fetch_one(&env.pool)
                        .await
                        .expect("has_function_privilege");
                assert!(!exec, "{kind:?}: {role} may execute {f}");
            }
        }
        for (_, member) in MEMBERS {
            assert_eq!(
                sqlstate_as(&env, member, "SELECT ledger_rules.metadata(NULL)").await,
                Some("42501".to_string()),
                "{kind:?}: {member} called ledger_rules.metadata"
            );
        }
    }
}

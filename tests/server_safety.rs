//! Never a lock that excludes nobody, never a server taken down, and names an operator can read:
//! the exclusion proof at connect against a real PostgreSQL whose advisory functions are stubs
//! that exclude nobody, a role whose search path shadows them (which changes nothing), a manager's
//! share of the server's lock table on a cluster with
//! a small one, and the application names of lock sessions and waiting connections.

mod common;

use std::process::{Command, Stdio};
use std::thread;
use std::time::Duration;

use common::{eventually, plain, plain_try_lock, plain_unlock, url};
use distlock::testing::{Setup, TestCluster};
use distlock::{ErrorKind, LockKey, LockManager};
use postgres::{Client, NoTls};

/// Creates (once per call, idempotently) a login role whose search path puts `schema` ahead of
/// `pg_catalog`, with stand-ins there for every advisory function the locks use, each
/// returning `true` (as CockroachDB's stubs do).
fn shadowing_role(schema: &str) -> String {
    let mut admin = plain();
    let mut sql = format!(
        "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}; \
         DO $$ BEGIN CREATE ROLE {schema}_user LOGIN PASSWORD 'stub'; \
         EXCEPTION WHEN duplicate_object THEN NULL; END $$; \
         GRANT USAGE ON SCHEMA {schema} TO {schema}_user; \
         ALTER ROLE {schema}_user SET search_path = {schema}, pg_catalog;"
    );
    sql.push_str(&stubs(schema, "true"));
    admin.batch_execute(&sql).expect("stub schema and role");
    format!("{} user={schema}_user password=stub", url())
}

/// `CREATE OR REPLACE FUNCTION` statements that make every advisory function the locks use in
/// `schema` return `answer` and take no lock.
fn stubs(schema: &str, answer: &str) -> String {
    let mut sql = String::new();
    for function in [
        "pg_try_advisory_lock",
        "pg_try_advisory_lock_shared",
        "pg_advisory_unlock",
        "pg_advisory_unlock_shared",
    ] {
        for args in ["bigint", "int, int"] {
            sql.push_str(&format!(
                "CREATE OR REPLACE FUNCTION {schema}.{function}({args}) RETURNS bool \
                 LANGUAGE sql AS 'SELECT {answer}::bool';"
            ));
        }
    }
    sql
}

#[test]
fn a_server_whose_locks_exclude_nobody_is_refused_and_postgresql_is_not() {
    if distlock::testing::database_url().is_some() {
        distlock::testing::skip("DATABASE_URL is set, and this test replaces a server's functions");
        return;
    }
    let key = LockKey::name("safety/stubbed");
    // A server whose own advisory functions accept calls and exclude nobody (CockroachDB's
    // stubs return true; others answer no row): pg_catalog's functions replaced on a cluster of
    // this test's own.
    for answer in ["true", "NULL"] {
        let cluster = TestCluster::start().expect("a cluster to stub");
        let mut admin = Client::connect(cluster.url(), NoTls).unwrap();
        admin
            .batch_execute(&format!(
                "SET allow_system_table_mods = on; {}",
                stubs("pg_catalog", answer)
            ))
            .expect("stub pg_catalog");
        // The harm: two sessions "take" the same lock, or none does.
        let mut a = Client::connect(cluster.url(), NoTls).unwrap();
        let mut b = Client::connect(cluster.url(), NoTls).unwrap();
        let granted = |c: &mut Client| {
            let sql = format!(
                "SELECT WHERE pg_catalog.pg_try_advisory_lock({})",
                key.as_id().unwrap()
            );
            common::rows_returned(&c.simple_query(&sql).unwrap()) == 1
        };
        let (ga, gb) = (granted(&mut a), granted(&mut b));
        assert!(
            (ga && gb) || (!ga && !gb),
            "{answer}: the stubs should grant both or neither"
        );
        // A manager refuses to connect, and says why.
        let err = LockManager::builder()
            .application_name("safety-stub")
            .connect(cluster.url())
            .expect_err("a server whose locks exclude nobody");
        assert_eq!(err.kind(), ErrorKind::NoExclusion, "{answer}: {err}");
        let text = err.to_string();
        assert!(text.contains("exclude nobody"), "{text}");
        assert!(text.contains("PostgreSQL"), "names version(): {text}");
        // So does the command, with its own exit code, and runs nothing.
        let marker = std::env::temp_dir().join(format!("distlock-stub-{}", std::process::id()));
        let out = Command::new(env!("CARGO_BIN_EXE_distlock"))
            .env("DATABASE_URL", cluster.url())
            .env_remove("PGAPPNAME")
            .stdin(Stdio::null())
            .args(["run", "--key", "safety/stubbed", "--", "touch"])
            .arg(&marker)
            .output()
            .expect("run distlock");
        assert_eq!(out.status.code(), Some(78), "{out:?}");
        assert!(!marker.exists(), "the command ran");
    }
    // A real server connects as before, and its locks exclude.
    let locks = common::manager("safety-normal");
    let guard = locks.try_lock(key).unwrap().expect("free");
    assert!(!plain_try_lock(&mut plain(), key), "a real lock excludes");
    drop(guard);
}

/// A role whose search path puts a schema of stand-ins ahead of `pg_catalog` changes nothing:
/// every function distlock calls is `pg_catalog`'s, so its locks are real and exclude.
#[test]
fn a_search_path_that_shadows_the_lock_functions_changes_nothing() {
    let params = shadowing_role("shadow");
    let key = LockKey::name("safety/shadowed");
    // The shadow is real: that role's unqualified calls reach the stand-ins.
    let mut shadowed = Client::connect(&params, NoTls).expect("the role connects");
    let sql = format!("SELECT pg_try_advisory_lock({})", key.as_id().unwrap());
    assert!(
        shadowed
            .query_one(sql.as_str(), &[])
            .unwrap()
            .get::<_, bool>(0)
    );
    assert!(
        plain_try_lock(&mut plain(), key),
        "the stand-in took no lock"
    );
    let locks = LockManager::builder()
        .application_name("safety-shadowed")
        .connect(&params)
        .expect("a shadowing search path is no reason to refuse");
    let guard = locks.try_lock(key).unwrap().expect("free");
    guard.ensure_held().unwrap();
    assert!(
        !plain_try_lock(&mut plain(), key),
        "the lock excludes a plain session"
    );
    let other = LockManager::connect(&params).unwrap();
    assert!(
        other.try_lock(key).unwrap().is_none(),
        "and another manager of the role"
    );
    let shared = LockKey::name("safety/shadowed-shared");
    let a = locks.try_lock_shared(shared).unwrap().expect("free");
    assert!(
        other.try_lock(shared).unwrap().is_none(),
        "shared excludes exclusive"
    );
    drop((guard, a));
    assert!(other.try_lock(key).unwrap().is_some(), "released for real");
}

#[test]
fn one_manager_stops_at_its_share_of_the_lock_table_and_new_connections_still_succeed() {
    if distlock::testing::database_url().is_some() {
        distlock::testing::skip("this test needs a cluster of its own with a small lock table");
        return;
    }
    // 10 × (300 connections + 0 prepared) = 3,000 entries: a manager may hold 750.
    let setup = Setup {
        settings: vec![("max_locks_per_transaction".into(), "10".into())],
        ..Setup::default()
    };
    let cluster = TestCluster::start_with(&setup).expect("a cluster with a small lock table");
    let connect = || Client::connect(cluster.url(), NoTls);
    // The harm: one session that fills the table takes new connections down.
    let mut hog = connect().unwrap();
    let filled =
        hog.simple_query("SELECT count(pg_advisory_lock(k)) FROM generate_series(1, 1000000) k");
    let e = filled.expect_err("the table runs out");
    assert!(format!("{e:?}").contains("shared memory"), "{e:?}");
    let Err(refused) = connect() else {
        panic!("a new connection succeeded while the table was full");
    };
    assert!(
        format!("{refused:?}").contains("shared memory"),
        "{refused:?}"
    );
    hog.batch_execute("SELECT pg_advisory_unlock_all()")
        .unwrap();
    drop(hog);
    // A manager that may hold 100,000 locks stops at its share.
    let locks = LockManager::builder()
        .application_name("safety-share")
        .max_locks(100_000)
        .connect(cluster.url())
        .unwrap();
    let mut guards = Vec::new();
    let refusal = loop {
        match locks.try_lock(guards.len() as i64) {
            Ok(Some(guard)) => guards.push(guard),
            Ok(None) => panic!("nobody else holds these keys"),
            Err(e) => break e,
        }
        assert!(guards.len() <= 3_000, "no limit was applied");
    };
    assert_eq!(refusal.kind(), ErrorKind::TooManyLocks, "{refusal}");
    assert_eq!(guards.len(), 750, "a quarter of the 3,000 entries");
    assert!(refusal.to_string().contains("lock table"), "{refusal}");
    // The server is fine: a new connection works, and takes locks of its own.
    let mut other = connect().expect("a new connection while the manager holds its share");
    assert!(plain_try_lock(&mut other, LockKey::id(-1)));
    drop(guards);
}

#[test]
fn the_connection_strings_application_name_is_kept_and_waiting_connections_say_they_wait() {
    let mut outside = plain();
    let name_of = |client: &mut Client, pattern: &str| -> i64 {
        client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                &[&pattern],
            )
            .unwrap()
            .get(0)
    };
    // The connection string's name, when the builder gives none.
    let billing =
        LockManager::connect(&format!("{} application_name=safety-billing", url())).unwrap();
    assert_eq!(name_of(&mut outside, "safety-billing"), 1);
    // The builder's name wins over it.
    let named = LockManager::builder()
        .application_name("safety-explicit")
        .connect(&format!("{} application_name=safety-ignored", url()))
        .unwrap();
    assert_eq!(name_of(&mut outside, "safety-explicit"), 1);
    assert_eq!(name_of(&mut outside, "safety-ignored"), 0);
    // A queued waiter shows as the manager's waiting connection, waiting on an advisory lock.
    let key = LockKey::name("safety/waiting-name");
    assert!(plain_try_lock(&mut outside, key));
    let waiter = {
        let billing = billing.clone();
        thread::spawn(move || billing.try_lock_for(key, Duration::from_secs(10)))
    };
    assert!(eventually(Duration::from_secs(5), || {
        outside
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE starts_with(application_name, \
                 'safety-billing (waiting') AND wait_event_type = 'Lock' \
                 AND wait_event = 'advisory'",
                &[],
            )
            .unwrap()
            .get::<_, i64>(0)
            == 1
    }));
    assert!(plain_unlock(&mut outside, key));
    let guard = waiter
        .join()
        .unwrap()
        .unwrap()
        .expect("granted once released");
    drop((guard, named));
}

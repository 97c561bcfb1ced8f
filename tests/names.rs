//! Names, not hashes: a waiting connection says what it waits for in `pg_stat_activity`, and a
//! manager that records names writes each one once to `public.distlock_names`, where `distlock
//! locks` finds it; a role that may not create the table still locks.

mod common;

use std::thread;
use std::time::Duration;

use common::{eventually, plain};
use distlock::{LockKey, LockManager};
use postgres::{Client, NoTls};

/// How long anything the tests wait for may take.
const LIMIT: Duration = Duration::from_secs(10);

/// The application names and queries of the sessions waiting for a lock whose name starts with
/// `app`.
fn waiting_as(client: &mut Client, app: &str) -> Vec<(String, String)> {
    client
        .query(
            "SELECT application_name, query FROM pg_stat_activity \
             WHERE wait_event_type = 'Lock' AND starts_with(application_name, $1)",
            &[&app],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// The application names of the sessions whose name starts with `app`.
fn sessions_named(client: &mut Client, app: &str) -> Vec<String> {
    let mut names: Vec<String> = client
        .query(
            "SELECT application_name FROM pg_stat_activity WHERE starts_with(application_name, $1)",
            &[&app],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    names.sort();
    names
}

/// The names recorded for `id` (none when the table is not there).
fn recorded(client: &mut Client, id: i64) -> Vec<String> {
    let exists: bool = client
        .query_one(
            "SELECT to_regclass('public.distlock_names') IS NOT NULL",
            &[],
        )
        .unwrap()
        .get(0);
    if !exists {
        return Vec::new();
    }
    client
        .query(
            "SELECT name FROM public.distlock_names WHERE id = $1 ORDER BY name",
            &[&id],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[test]
fn a_waiting_connection_shows_the_name_it_waits_for_and_its_own_name_after() {
    let name = "names-test nightly-report";
    let holder = common::manager("names-holder");
    let held = holder.try_lock(name).unwrap().expect("free");
    let waiter = common::manager("names-worker-7");
    let mut admin = plain();
    thread::scope(|s| {
        let wait = s.spawn(|| waiter.try_lock_for(name, LIMIT).unwrap());
        assert!(
            eventually(LIMIT, || !waiting_as(&mut admin, "names-worker-7")
                .is_empty()),
            "the waiter never queued"
        );
        let waiting = waiting_as(&mut admin, "names-worker-7");
        assert_eq!(waiting.len(), 1, "{waiting:?}");
        assert_eq!(waiting[0].0, format!("names-worker-7 (waiting: {name})"));
        // The name travels as a bound parameter, never in a statement's text.
        assert!(!waiting[0].1.contains(name), "{}", waiting[0].1);
        drop(held);
        let guard = wait.join().unwrap().expect("granted after the release");
        // Held by the waiting connection, under its own name again.
        assert_eq!(
            sessions_named(&mut admin, "names-worker-7"),
            ["names-worker-7", "names-worker-7 (waiting connection)"]
        );
        drop(guard);
    });
}

#[test]
fn a_timed_out_wait_and_a_semaphore_wait_are_labelled_then_reset() {
    let holder = common::manager("names-sem-holder");
    let waiter = common::manager("names-sem-waiter");
    let mut admin = plain();
    // A key given as an id shows the id.
    let id = LockKey::id(0x5eed_0001);
    let held = holder.try_lock(id).unwrap().expect("free");
    thread::scope(|s| {
        let wait = s.spawn(|| waiter.try_lock_for(id, Duration::from_secs(2)).unwrap());
        let label = format!("names-sem-waiter (waiting: {})", id.as_id().unwrap());
        assert!(
            eventually(LIMIT, || waiting_as(&mut admin, "names-sem-waiter")
                .iter()
                .any(|(app, _)| *app == label)),
            "{:?}",
            sessions_named(&mut admin, "names-sem-waiter")
        );
        assert!(wait.join().unwrap().is_none(), "held all along");
    });
    assert_eq!(
        sessions_named(&mut admin, "names-sem-waiter"),
        ["names-sem-waiter", "names-sem-waiter (waiting connection)"],
        "a timed-out wait resets its label"
    );
    drop(held);
    // A semaphore's waiters queue for its turnstile: the first holds it and tries the slots,
    // the next waits in the lock queue, labelled with the semaphore's name.
    let permit = holder
        .try_acquire_permit("names-test exports", 1)
        .unwrap()
        .expect("free");
    let second = common::manager("names-sem-second");
    thread::scope(|s| {
        let first = s.spawn(|| {
            waiter
                .try_acquire_permit_for("names-test exports", 1, LIMIT)
                .unwrap()
        });
        thread::sleep(Duration::from_millis(200));
        let next = s.spawn(|| {
            second
                .try_acquire_permit_for("names-test exports", 1, LIMIT)
                .unwrap()
        });
        assert!(
            eventually(LIMIT, || waiting_as(&mut admin, "names-sem-second")
                .iter()
                .any(
                    |(app, _)| app == "names-sem-second (waiting: names-test exports)"
                )),
            "{:?}",
            sessions_named(&mut admin, "names-sem-")
        );
        drop(permit);
        drop(first.join().unwrap().expect("the first waiter's permit"));
        assert!(next.join().unwrap().is_some());
    });
}

#[test]
fn names_are_recorded_once_per_manager_only_when_asked() {
    let mut admin = plain();
    let quiet = common::manager("names-quiet");
    let unrecorded = "names-test never recorded";
    drop(quiet.try_lock(unrecorded).unwrap().expect("free"));
    let recording = LockManager::builder()
        .application_name("names-recording")
        .record_names(true)
        .connect(common::url())
        .unwrap();
    let name = "names-test recorded";
    let id = LockKey::name(name).as_id().unwrap();
    drop(recording.try_lock(name).unwrap().expect("free"));
    assert!(
        eventually(LIMIT, || recorded(&mut admin, id) == [name]),
        "the name was never recorded"
    );
    // A semaphore's name, and a name given through a wait.
    drop(recording.try_acquire_permit("names-test sem", 3).unwrap());
    drop(recording.try_lock_for("names-test waited", LIMIT).unwrap());
    // An election's name, through its campaign.
    let election = distlock::Election::new(&recording, "names-test election");
    drop(election.try_campaign().unwrap().expect("leads"));
    for n in ["names-test sem", "names-test waited", "names-test election"] {
        let id = LockKey::name(n).as_id().unwrap();
        assert!(eventually(LIMIT, || recorded(&mut admin, id) == [n]), "{n}");
    }
    // Once per manager: a name already noted is not written again.
    admin
        .execute("DELETE FROM public.distlock_names WHERE id = $1", &[&id])
        .unwrap();
    drop(recording.try_lock(name).unwrap().expect("free"));
    drop(
        recording
            .try_lock("names-test marker")
            .unwrap()
            .expect("free"),
    );
    let marker = LockKey::name("names-test marker").as_id().unwrap();
    assert!(eventually(LIMIT, || !recorded(&mut admin, marker).is_empty()));
    assert!(recorded(&mut admin, id).is_empty(), "written twice");
    let never = LockKey::name(unrecorded).as_id().unwrap();
    assert!(recorded(&mut admin, never).is_empty(), "recorded while off");
    // What a screen of holders asks for an id it found elsewhere: by id, by a slot's key (the
    // semaphore's name), nothing for an unnamed key.
    assert_eq!(
        quiet.names_of(LockKey::id(marker)).unwrap(),
        ["names-test marker"]
    );
    let slot = LockKey::name("names-test sem").permit_slot(2);
    assert_eq!(quiet.names_of(slot).unwrap(), ["names-test sem"]);
    assert!(quiet.names_of(never).unwrap().is_empty());
    assert!(quiet.names_of((7, 9)).unwrap().is_empty());
    // The table dropped under a manager that has written to it: made again at a later write.
    admin
        .batch_execute("DROP TABLE public.distlock_names")
        .unwrap();
    let again = "names-test after a drop";
    drop(recording.try_lock(again).unwrap().expect("free"));
    let again_id = LockKey::name(again).as_id().unwrap();
    assert!(
        eventually(LIMIT, || recorded(&mut admin, again_id) == [again]),
        "not recorded after the table was dropped"
    );
}

#[test]
fn a_role_that_may_not_create_the_table_still_locks() {
    let Some(cluster) = common::bouncer::cluster() else {
        return;
    };
    let mut admin = Client::connect(cluster.url(), NoTls).unwrap();
    admin
        .batch_execute(
            "CREATE ROLE plain_user LOGIN PASSWORD 'plain-secret'; \
             REVOKE CREATE ON SCHEMA public FROM PUBLIC",
        )
        .unwrap();
    let url = format!(
        "host=127.0.0.1 port={} user=plain_user password=plain-secret dbname=postgres",
        cluster.port().unwrap()
    );
    let locks = LockManager::builder()
        .record_names(true)
        .connect(&url)
        .unwrap();
    for round in 0..3 {
        let guard = locks
            .try_lock(format!("names-test denied {round}"))
            .unwrap();
        assert!(guard.is_some());
        thread::sleep(Duration::from_millis(200));
    }
    let exists: bool = admin
        .query_one(
            "SELECT to_regclass('public.distlock_names') IS NOT NULL",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(!exists);
    assert!(locks.offline().is_none(), "{:?}", locks.offline());
    // Created once by a role that may, the same manager's later names are not written (it
    // stopped after its one warning), while a new manager of the role writes them.
    admin
        .batch_execute(
            "CREATE TABLE public.distlock_names (id int8 NOT NULL, name text NOT NULL, \
             PRIMARY KEY (id, name)); GRANT SELECT, INSERT ON public.distlock_names TO plain_user",
        )
        .unwrap();
    let again = LockManager::builder()
        .record_names(true)
        .connect(&url)
        .unwrap();
    drop(again.try_lock("names-test granted").unwrap());
    let id = LockKey::name("names-test granted").as_id().unwrap();
    assert!(eventually(LIMIT, || recorded(&mut admin, id) == ["names-test granted"]));
}

#[test]
fn any_name_locks_and_is_recorded_or_labelled_as_it_can_be() {
    let mut admin = plain();
    let locks = LockManager::builder()
        .application_name("names-any")
        .record_names(true)
        .connect(common::url())
        .unwrap();
    let long = format!("names-test {}", "\u{1f512}".repeat(2500));
    for name in [
        "names-test nul\0inside",
        long.as_str(),
        "names-test ' ; DROP TABLE x; --",
    ] {
        drop(locks.try_lock(name).unwrap().expect("free"));
    }
    let id = |n: &str| LockKey::name(n).as_id().unwrap();
    assert!(eventually(LIMIT, || recorded(&mut admin, id(&long)) == [long.clone()]));
    let quote = "names-test ' ; DROP TABLE x; --";
    assert!(eventually(LIMIT, || recorded(&mut admin, id(quote)) == [quote]));
    // PostgreSQL's text holds no NUL: that name locks, and is not recorded.
    assert!(recorded(&mut admin, id("names-test nul\0inside")).is_empty());
    // A waiter for the long name shows as much of it as fits, cut on a character boundary.
    let held = locks.try_lock(long.as_str()).unwrap().expect("free");
    let waiter = common::manager("names-any-waiter");
    thread::scope(|s| {
        let wait = s.spawn(|| waiter.try_lock_for(long.as_str(), LIMIT).unwrap());
        let mut label = String::new();
        assert!(eventually(LIMIT, || {
            label = waiting_as(&mut admin, "names-any-waiter")
                .pop()
                .map(|(app, _)| app)
                .unwrap_or_default();
            !label.is_empty()
        }));
        assert!(
            label.starts_with("names-any-waiter (waiting: names-test "),
            "{label}"
        );
        assert!(label.len() <= 63, "{label}");
        drop(held);
        assert!(wait.join().unwrap().is_some());
    });
    let nul = "names-test nul\0wait";
    let held = locks.try_lock(nul).unwrap().expect("free");
    thread::scope(|s| {
        let wait = s.spawn(|| waiter.try_lock_for(nul, LIMIT).unwrap());
        assert!(eventually(LIMIT, || waiting_as(
            &mut admin,
            "names-any-waiter"
        )
        .iter()
        .any(
            |(app, _)| app == "names-any-waiter (waiting: names-test nul?wait)"
        )));
        drop(held);
        assert!(wait.join().unwrap().is_some());
    });
}

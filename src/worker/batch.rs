//! Batching: requests that queued while the worker was busy go to the server as one
//! multi-statement query, and each statement's row count is mapped back to its request.
//!
//! Statement order: releases first, then tries and checks, each group in arrival order. Every
//! caller has at most one request in flight, so no caller's own order changes; and a try can only
//! be queued beside a release of the same key when both are shared (the manager's table refuses
//! anything else), where the order does not change either outcome.
//!
//! A multi-statement query is one implicit transaction: if a statement fails, the ones before it
//! keep their effect (session locks ignore rollback) and the ones after it never run, and the
//! client does not say which statement failed. So a request joins the query only if its outcome
//! can be read back from `pg_locks` afterwards: its key and mode appear once in the query, and its
//! own hold is the manager's only hold of the key (`sole_hold`: for a try, the session held the
//! key not at all before it; for a release, exactly once). The others run alone, after the query.
//! (A grant abandoned by its caller is given back before the next batch is formed, so it never
//! hides behind `sole_hold`.)
//!
//! After a rejected statement the batch reads back from `pg_locks` what each statement did — a try
//! whose key is now held ran and was granted, a release whose key is no longer held ran — and runs
//! the rest again one by one, so it never reports a grant or a release that did not happen. If the
//! connection breaks, what ran is unknown, and the whole connection is given up: its locks go with
//! it.

use crate::error::Error;
use crate::protocol::request::{Op, Plain};
use crate::worker::session::{Failed, Query, Session};

/// The most requests sent to the server in one query.
pub(crate) const MAX_BATCH: usize = 64;

/// What became of one request of a batch.
#[derive(Debug, Default)]
pub(crate) enum Outcome {
    /// Not run: the batch was cut short.
    #[default]
    Pending,
    /// Not run: a release or check of another generation, whose session is gone (answered
    /// `NotHeld` without touching this session).
    OtherGeneration,
    /// Ran; whether its statement returned its row.
    Done(bool),
    /// Must run again alone (during recovery only).
    Retry,
    /// The server rejected it.
    Failed(Error),
}

/// The connection broke while the batch ran: what ran is unknown, and the connection must go.
#[derive(Debug)]
pub(crate) struct Broken(pub(crate) Error);

/// The requests of one batch and what became of each. The vectors keep their capacity, so
/// steady-state batches allocate nothing here.
#[derive(Debug)]
pub(crate) struct Batch {
    /// The requests, in arrival order.
    pub(crate) requests: Vec<Plain>,
    /// Indices into `requests` of the statements in the query, in query order.
    order: Vec<usize>,
    /// Indices into `requests` of requests that run alone after the query.
    solo: Vec<usize>,
    /// The outcome of each request.
    outcomes: Vec<Outcome>,
}

impl Batch {
    pub(crate) fn new() -> Batch {
        Batch {
            requests: Vec::with_capacity(MAX_BATCH),
            order: Vec::with_capacity(MAX_BATCH),
            solo: Vec::with_capacity(MAX_BATCH),
            outcomes: Vec::with_capacity(MAX_BATCH),
        }
    }

    /// Takes the outcome of request `i`, leaving `Pending`.
    pub(crate) fn take_outcome(&mut self, i: usize) -> Outcome {
        self.outcomes
            .get_mut(i)
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Runs `self.requests` on `session`, the connection of `generation`, as one query where that
    /// is exact and one by one where it is not; records every request's outcome.
    pub(crate) fn run(
        &mut self,
        query: &mut Query,
        session: &mut impl Session,
        generation: u64,
    ) -> Result<(), Broken> {
        query.sql.clear();
        self.order.clear();
        self.solo.clear();
        for pass in [Op::Unlock, Op::TryLock] {
            for (i, r) in self.requests.iter().enumerate() {
                let in_pass = match pass {
                    Op::Unlock => r.op == Op::Unlock,
                    _ => r.op != Op::Unlock,
                };
                if !in_pass || (r.op != Op::TryLock && r.generation != generation) {
                    continue; // the latter are answered without touching this session
                }
                let unique = !self.order.iter().any(|&j| {
                    let other = &self.requests[j];
                    other.key == r.key && other.mode == r.mode
                });
                if unique && (r.sole_hold || r.op == Op::Check) {
                    query.sql.push(r.op, r.mode, r.key);
                    self.order.push(i);
                } else {
                    self.solo.push(i);
                }
            }
        }
        self.outcomes.clear();
        self.outcomes.extend(self.requests.iter().map(|r| {
            if r.op != Op::TryLock && r.generation != generation {
                Outcome::OtherGeneration
            } else {
                Outcome::Pending
            }
        }));
        if !self.order.is_empty() {
            match query.run(session) {
                Ok(()) => self.record(&query.counts)?,
                Err(Failed::Broken(e)) => return Err(Broken(e)),
                Err(Failed::Rejected(e)) => self.recover(query, session, e)?,
            }
        }
        // Solo requests, in arrival order, one statement each.
        for k in 0..self.solo.len() {
            let i = self.solo[k];
            self.run_alone(query, session, i)?;
        }
        Ok(())
    }

    /// Maps the query's row counts to the requests of `order`.
    fn record(&mut self, counts: &[u64]) -> Result<(), Broken> {
        if counts.len() != self.order.len() {
            return Err(Broken(count_mismatch(counts.len(), self.order.len())));
        }
        for (&i, &n) in self.order.iter().zip(counts) {
            self.outcomes[i] = Outcome::Done(n == 1);
        }
        Ok(())
    }

    /// After a rejected statement: reads back from `pg_locks` what each statement did, then runs
    /// the rest again alone.
    fn recover(
        &mut self,
        query: &mut Query,
        session: &mut impl Session,
        rejected: Error,
    ) -> Result<(), Broken> {
        log::warn!(
            "distlock worker: a batched statement failed ({rejected}); recovering statement by \
             statement"
        );
        query.sql.clear();
        for &i in &self.order {
            let r = &self.requests[i];
            query.sql.push(Op::Check, r.mode, r.key);
        }
        match query.run(session) {
            Ok(()) => {}
            // Without the read-back nothing can be known: give the connection up.
            Err(Failed::Broken(e) | Failed::Rejected(e)) => return Err(Broken(e)),
        }
        if query.counts.len() != self.order.len() {
            return Err(Broken(count_mismatch(query.counts.len(), self.order.len())));
        }
        for (&i, &n) in self.order.iter().zip(&query.counts) {
            let held_now = n == 1;
            self.outcomes[i] = match (self.requests[i].op, held_now) {
                (Op::TryLock, true) => Outcome::Done(true), // it ran and was granted
                (Op::Unlock, false) => Outcome::Done(true), // it ran and released
                _ => Outcome::Retry,                        // did not run, or refused
            };
        }
        for k in 0..self.order.len() {
            let i = self.order[k];
            if matches!(self.outcomes[i], Outcome::Retry) {
                self.run_alone(query, session, i)?;
            }
        }
        Ok(())
    }

    /// Runs request `i` as a statement of its own.
    fn run_alone(
        &mut self,
        query: &mut Query,
        session: &mut impl Session,
        i: usize,
    ) -> Result<(), Broken> {
        let r = &self.requests[i];
        self.outcomes[i] = match query.one(session, r.op, r.mode, r.key) {
            Ok(row) => Outcome::Done(row),
            Err(Failed::Rejected(e)) => Outcome::Failed(e),
            Err(Failed::Broken(e)) => return Err(Broken(e)),
        };
        Ok(())
    }
}

fn count_mismatch(got: usize, sent: usize) -> Error {
    Error::new(
        crate::error::ErrorKind::ConnectionLost,
        format!("the server answered {got} statements of {sent}"),
    )
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;
    use crate::error::ErrorKind;
    use crate::key::LockKey;
    use crate::mode::Mode;
    use crate::protocol::slot::{self, ReplySlot};

    /// A session that answers from a script: each query must be the expected text, and gets the
    /// scripted row counts or failure.
    struct Scripted {
        script: VecDeque<(String, Result<Vec<u64>, bool>)>,
    }

    /// One scripted query: its text and either row counts or a failure (`true`: the connection
    /// breaks; `false`: the server rejects a statement).
    fn step(sql: &str, answer: Result<Vec<u64>, bool>) -> (String, Result<Vec<u64>, bool>) {
        (sql.to_owned(), answer)
    }

    impl Scripted {
        fn new(script: Vec<(String, Result<Vec<u64>, bool>)>) -> Scripted {
            Scripted {
                script: script.into(),
            }
        }

        fn done(&self) -> bool {
            self.script.is_empty()
        }
    }

    impl Session for Scripted {
        fn run(&mut self, sql: &str, counts: &mut Vec<u64>) -> Result<(), Failed> {
            let (expected, answer) = self.script.pop_front().expect("an unexpected query");
            let sql = sql
                .strip_prefix(crate::sql::PIN)
                .expect("every query text starts with the pin");
            assert_eq!(sql, expected);
            match answer {
                Ok(rows) => {
                    *counts = rows;
                    Ok(())
                }
                Err(true) => Err(Failed::Broken(Error::new(
                    ErrorKind::ConnectionLost,
                    "scripted break",
                ))),
                Err(false) => Err(Failed::Rejected(Error::new(
                    ErrorKind::Server,
                    "scripted rejection",
                ))),
            }
        }
    }

    fn request(op: Op, key: i64, sole_hold: bool) -> Plain {
        Plain {
            op,
            mode: Mode::Exclusive,
            key: LockKey::id(key),
            generation: if op == Op::TryLock { 0 } else { 1 },
            sole_hold,
            reply: slot::arm(&ReplySlot::new()),
        }
    }

    fn outcomes(batch: &mut Batch) -> Vec<String> {
        (0..batch.requests.len())
            .map(|i| match batch.take_outcome(i) {
                Outcome::Pending => "pending".to_owned(),
                Outcome::OtherGeneration => "other generation".to_owned(),
                Outcome::Done(row) => format!("done {row}"),
                Outcome::Retry => "retry".to_owned(),
                Outcome::Failed(e) => format!("failed {:?}", e.kind()),
            })
            .collect()
    }

    fn try_lock(k: i64) -> String {
        format!("SELECT WHERE pg_catalog.pg_try_advisory_lock({k})")
    }

    fn unlock(k: i64) -> String {
        format!("SELECT WHERE pg_catalog.pg_advisory_unlock({k})")
    }

    fn check(k: i64) -> String {
        format!(
            "SELECT 1 FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid() \
             AND granted AND mode = 'ExclusiveLock' AND classid = 0 AND objid = {k} \
             AND objsubid = 1"
        )
    }

    fn joined(statements: &[String]) -> String {
        statements.join(";")
    }

    #[test]
    fn releases_go_first_and_row_counts_map_back_in_query_order() {
        let mut batch = Batch::new();
        batch.requests = vec![
            request(Op::TryLock, 1, true),
            request(Op::Unlock, 2, true),
            request(Op::TryLock, 3, true),
        ];
        let mut session = Scripted::new(vec![step(
            &joined(&[unlock(2), try_lock(1), try_lock(3)]),
            Ok(vec![1, 0, 1]),
        )]);
        batch.run(&mut Query::new(), &mut session, 1).unwrap();
        assert!(session.done());
        assert_eq!(
            outcomes(&mut batch),
            ["done false", "done true", "done true"]
        );
    }

    #[test]
    fn a_statement_failing_mid_batch_is_read_back_and_the_rest_replayed_one_by_one() {
        let mut batch = Batch::new();
        batch.requests = vec![
            request(Op::TryLock, 1, true),
            request(Op::TryLock, 2, true),
            request(Op::TryLock, 3, true),
            request(Op::Unlock, 4, true),
            request(Op::Unlock, 5, true),
        ];
        let query = joined(&[unlock(4), unlock(5), try_lock(1), try_lock(2), try_lock(3)]);
        // The fourth statement (the try of key 2) fails: the two releases and the try of key 1
        // ran before it, the try of key 3 never ran. pg_locks shows keys 4 and 5 released, key 1
        // held, keys 2 and 3 not held.
        let read_back = joined(&[check(4), check(5), check(1), check(2), check(3)]);
        let mut session = Scripted::new(vec![
            step(&query, Err(false)),
            step(&read_back, Ok(vec![0, 0, 1, 0, 0])),
            // Replayed alone: key 2 is refused by the server again, key 3 is granted.
            step(&try_lock(2), Err(false)),
            step(&try_lock(3), Ok(vec![1])),
        ]);
        batch.run(&mut Query::new(), &mut session, 1).unwrap();
        assert!(session.done());
        assert_eq!(
            outcomes(&mut batch),
            [
                "done true",
                "failed Server",
                "done true",
                "done true",
                "done true"
            ]
        );
    }

    #[test]
    fn a_release_the_read_back_still_sees_held_is_run_again() {
        let mut batch = Batch::new();
        batch.requests = vec![request(Op::Unlock, 7, true), request(Op::TryLock, 8, true)];
        let mut session = Scripted::new(vec![
            step(&joined(&[unlock(7), try_lock(8)]), Err(false)),
            // The release failed (key 7 still held); the try never ran.
            step(&joined(&[check(7), check(8)]), Ok(vec![1, 0])),
            step(&unlock(7), Ok(vec![1])),
            step(&try_lock(8), Ok(vec![0])),
        ]);
        batch.run(&mut Query::new(), &mut session, 1).unwrap();
        assert!(session.done());
        assert_eq!(outcomes(&mut batch), ["done true", "done false"]);
    }

    #[test]
    fn a_batch_cut_by_a_lost_connection_reports_nothing_as_done() {
        let mut batch = Batch::new();
        batch.requests = vec![request(Op::TryLock, 1, true), request(Op::TryLock, 2, true)];
        let mut session =
            Scripted::new(vec![step(&joined(&[try_lock(1), try_lock(2)]), Err(true))]);
        let err = batch.run(&mut Query::new(), &mut session, 1).unwrap_err();
        assert_eq!(err.0.kind(), ErrorKind::ConnectionLost);
        assert_eq!(outcomes(&mut batch), ["pending", "pending"]);
    }

    #[test]
    fn a_connection_lost_during_the_read_back_gives_the_connection_up() {
        let mut batch = Batch::new();
        batch.requests = vec![request(Op::TryLock, 1, true), request(Op::TryLock, 2, true)];
        let mut session = Scripted::new(vec![
            step(&joined(&[try_lock(1), try_lock(2)]), Err(false)),
            step(&joined(&[check(1), check(2)]), Err(true)),
        ]);
        assert!(batch.run(&mut Query::new(), &mut session, 1).is_err());
        assert!(session.done());
    }

    #[test]
    fn a_short_answer_is_a_broken_connection_not_a_guess() {
        let mut batch = Batch::new();
        batch.requests = vec![request(Op::TryLock, 1, true), request(Op::TryLock, 2, true)];
        let mut session = Scripted::new(vec![step(
            &joined(&[try_lock(1), try_lock(2)]),
            Ok(vec![1]),
        )]);
        assert!(batch.run(&mut Query::new(), &mut session, 1).is_err());
    }

    #[test]
    fn requests_that_cannot_be_read_back_run_alone_after_the_query() {
        let mut batch = Batch::new();
        batch.requests = vec![
            // A release of a key held twice by the manager: not its sole hold.
            request(Op::Unlock, 1, false),
            request(Op::TryLock, 2, true),
            // The same key and mode twice: only the first can be read back.
            request(Op::TryLock, 2, true),
            // A release for another generation: answered without the session.
            Plain {
                generation: 9,
                ..request(Op::Unlock, 3, true)
            },
        ];
        let mut session = Scripted::new(vec![
            step(&try_lock(2), Ok(vec![1])),
            step(&unlock(1), Ok(vec![1])),
            step(&try_lock(2), Ok(vec![1])),
        ]);
        batch.run(&mut Query::new(), &mut session, 1).unwrap();
        assert!(session.done());
        assert_eq!(
            outcomes(&mut batch),
            ["done true", "done true", "done true", "other generation"]
        );
    }
}

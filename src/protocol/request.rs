//! What callers ask of the worker: a [`Request`] is either one key's try, release or check
//! ([`Plain`], batched with others) or a request beyond one key's ([`Solo`], one statement of
//! its own), each with the reply slot its answer goes to.

use std::time::Instant;

use crate::key::LockKey;
use crate::mode::Mode;
use crate::protocol::slot::Ticket;

/// The most permits a semaphore may have: each try may look at every slot before a free one.
pub(crate) const MAX_PERMITS: u32 = 10_000;

/// The most keys one all-or-nothing grant may take.
pub(crate) const MAX_KEYS: usize = 1_000;

/// What a plain statement does to a key.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Op {
    /// Try once to take the lock; never waits on the server.
    TryLock,
    /// Release one hold of the lock.
    Unlock,
    /// Prove that this session holds the lock: one row when `pg_locks` shows it granted to us.
    Check,
}

/// One request to the worker.
#[derive(Debug)]
pub(crate) enum Request {
    /// One key's try, release or check.
    Plain(Plain),
    /// A request beyond one key's, answered by its own kind of reply.
    Solo(Box<Solo>, Ticket),
}

/// One key's try, release or check, and where its outcome goes.
#[derive(Debug)]
pub(crate) struct Plain {
    /// Lock, unlock or check.
    pub(crate) op: Op,
    /// Exclusive or shared.
    pub(crate) mode: Mode,
    /// The advisory lock it concerns.
    pub(crate) key: LockKey,
    /// For `Unlock` and `Check`: the connection generation that granted the hold. A worker of any
    /// other generation answers without touching its session, whose holds are not this guard's.
    pub(crate) generation: u64,
    /// The manager holds (or is taking) this key exactly once: this request's own hold. Then its
    /// statement's effect can be read back from `pg_locks` if a batch fails, so it may be batched.
    pub(crate) sole_hold: bool,
    /// Where the outcome goes.
    pub(crate) reply: Ticket,
}

/// A request beyond one key's try, release or check. Each runs alone, as one statement (a wait:
/// one round trip) of its own, and gets the reply its documentation names.
#[derive(Debug)]
pub(crate) enum Solo {
    /// An exclusive try that also draws a fencing token: [`Reply::Grant`](crate::protocol::reply::Reply::Grant) (with the token) or
    /// [`Reply::Busy`](crate::protocol::reply::Reply::Busy).
    Fenced(LockKey),
    /// A try of a free slot of the semaphore `key` with `permits` slots: [`Reply::Grant`](crate::protocol::reply::Reply::Grant) of the
    /// slot's key, or [`Reply::Busy`](crate::protocol::reply::Reply::Busy).
    Permit {
        /// The semaphore.
        key: LockKey,
        /// Its number of slots.
        permits: u32,
    },
    /// Every key or none: [`Reply::Grant`](crate::protocol::reply::Reply::Grant) of all of them, or [`Reply::Busy`](crate::protocol::reply::Reply::Busy) with none held.
    All {
        /// The keys, each once.
        keys: Vec<LockKey>,
        /// The mode of every key.
        mode: Mode,
    },
    /// Who holds or waits for the key: [`Reply::Holders`](crate::protocol::reply::Reply::Holders).
    Holders(LockKey),
    /// The names recorded for the key (of its semaphore, for a slot's key):
    /// [`Reply::Names`](crate::protocol::reply::Reply::Names).
    Names(LockKey),
    /// Draws one fencing token, taking no lock (transaction mode draws a lock's token after its
    /// grant, outside its transaction): [`Reply::Grant`](crate::protocol::reply::Reply::Grant) of
    /// no keys, with the token.
    Token,
    /// Waits in PostgreSQL's lock queue for every one of the keys, on a waiting connection
    /// (never on the manager's own): [`Reply::Grant`](crate::protocol::reply::Reply::Grant), or [`Reply::Busy`](crate::protocol::reply::Reply::Busy) at the deadline with
    /// nothing held.
    Wait(Wait),
}

/// A wait in PostgreSQL's lock queue.
#[derive(Debug)]
pub(crate) struct Wait {
    /// The keys, in the order of their ids (every caller's order, so waits cannot deadlock
    /// each other).
    pub(crate) keys: Vec<LockKey>,
    /// The mode of every key.
    pub(crate) mode: Mode,
    /// Whether the grant draws a fencing token.
    pub(crate) fencing: Fencing,
    /// When the server ends the wait (`None`: when granted).
    pub(crate) deadline: Option<Instant>,
    /// The waiting connection's `application_name` while it waits (`caller::waiting`'s label).
    pub(crate) label: Box<str>,
}

/// Whether a grant comes with a fencing token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fencing {
    /// Draw a token after the grant, in the same round trip.
    Token,
    /// A grant without a token.
    NoToken,
}

impl Request {
    /// What answering this request without running it needs (the worker is offline, or its
    /// connection failed before it ran): its ticket, and for a plain request the key and mode a
    /// grant would have been for.
    pub(crate) fn into_ticket(self) -> (Ticket, Option<(LockKey, Mode)>) {
        match self {
            Request::Plain(p) => (p.reply, Some((p.key, p.mode))),
            Request::Solo(_, ticket) => (ticket, None),
        }
    }
}

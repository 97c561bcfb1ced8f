//! What the worker answers: one [`Reply`] per request, of the kind that request gets.

use crate::error::Error;
use crate::holder::Holder;
use crate::key::LockKey;
use crate::mode::Mode;
use crate::protocol::link::Lease;

/// The worker's answer to one request.
#[derive(Debug)]
pub(crate) enum Reply {
    /// A plain try: the session now holds the lock, under this lease.
    Granted(Lease),
    /// A try of any kind: another session holds the lock (or every slot, or one of the keys),
    /// or a wait in the lock queue reached its deadline.
    Busy,
    /// A plain release: the session released one hold.
    Released,
    /// A check: the session holds the lock.
    Held,
    /// A release or check: the session does not hold the lock (the connection that took it
    /// ended, and the server freed it).
    NotHeld,
    /// The statement failed.
    Failed(Error),
    /// A fenced try, a permit, an all-or-nothing try or a wait in the lock queue: granted.
    Grant(Box<Grant>),
    /// A holder lookup: who holds or waits for the key.
    Holders(Vec<Holder>),
    /// A names lookup: the names recorded for the key, in order.
    Names(Vec<String>),
}

/// What a grant beyond one plain try holds for its caller.
#[derive(Debug)]
pub(crate) struct Grant {
    /// The connection generation that granted it, and its loss signal.
    pub(crate) lease: Lease,
    /// The keys the session now holds for the caller, all in `mode`: one for a fenced grant
    /// or a permit (the slot's key), every key for an all-or-nothing grant or a wait.
    pub(crate) held: Vec<LockKey>,
    /// The mode of `held`.
    pub(crate) mode: Mode,
    /// The fencing token, when one was asked for.
    pub(crate) token: Option<u64>,
}

impl Grant {
    /// The reply granting `held` in `mode` under `lease`.
    pub(crate) fn reply(
        lease: &Lease,
        held: Vec<LockKey>,
        mode: Mode,
        token: Option<u64>,
    ) -> Reply {
        Reply::Grant(Box::new(Grant {
            lease: lease.clone(),
            held,
            mode,
            token,
        }))
    }

    /// Adds the holds of this grant, which nobody will own, to `orphans`.
    pub(crate) fn orphans(&self, orphans: &mut Vec<Orphan>) {
        orphans.extend(self.held.iter().map(|&key| Orphan {
            key,
            mode: self.mode,
            generation: self.lease.generation,
        }));
    }
}

/// A grant whose caller gave up after the worker had claimed its reply: nobody will own it, so
/// the worker releases it if its session is still the current one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Orphan {
    /// The lock granted.
    pub(crate) key: LockKey,
    /// Exclusive or shared.
    pub(crate) mode: Mode,
    /// The connection generation that granted it.
    pub(crate) generation: u64,
}

impl Reply {
    /// True for a reply that grants holds.
    pub(crate) fn is_grant(&self) -> bool {
        matches!(self, Reply::Granted(_) | Reply::Grant(_))
    }

    /// The holds in this reply that nobody will own, when its caller gave up: a plain grant's
    /// (whose key and mode the request had), or every hold of a grant beyond it.
    pub(crate) fn orphans(self, plain: Option<(LockKey, Mode)>, orphans: &mut Vec<Orphan>) {
        match (self, plain) {
            (Reply::Granted(lease), Some((key, mode))) => orphans.push(Orphan {
                key,
                mode,
                generation: lease.generation,
            }),
            (Reply::Grant(grant), _) => grant.orphans(orphans),
            _ => {}
        }
    }
}

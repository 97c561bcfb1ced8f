//! The caller side of the worker's channel: the handle ([`handle`]), the state its clones and
//! guards share ([`shared`]), the table of held keys ([`table`]), guards ([`guard`]), the one
//! acquire path ([`acquire`]), waiting ([`waiting`]) and the waiting connections ([`pool`]).
//! Imports the ground floor and the protocol, never the worker side.

pub(crate) mod acquire;
pub(crate) mod guard;
pub(crate) mod handle;
pub(crate) mod held_watch;
#[cfg(feature = "metrics")]
pub(crate) mod metrics;
pub(crate) mod pool;
pub(crate) mod shared;
pub(crate) mod table;
pub(crate) mod waiting;

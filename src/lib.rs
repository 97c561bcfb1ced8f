//! Distributed locks on PostgreSQL session advisory locks, for threaded (non-async) programs.
//!
//! TODO crate docs
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod backoff;
mod error;
mod guard;
mod key;
mod manager;
mod reply;
mod sql;
mod table;
pub mod testing;
mod worker;

pub use crossbeam_channel;
pub use error::{Error, ErrorKind, Result};
pub use guard::LockGuard;
pub use key::LockKey;
pub use manager::{Builder, LockManager};
pub use postgres;

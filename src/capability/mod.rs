//! The capabilities beyond one lock, one room each, built on the caller side (the election on
//! the public API alone); none reaches the worker side.

pub(crate) mod election;
mod fenced;
mod holders;
mod multi_key;
mod permits;

//! The messages between the two sides of the worker's channel: what callers ask
//! ([`request`]), what the worker answers ([`reply`]), the reusable slots replies travel in
//! ([`slot`]), and the connection's state both sides read ([`link`]). Imports the ground floor
//! only.

pub(crate) mod link;
pub(crate) mod names;
pub(crate) mod reply;
pub(crate) mod request;
pub(crate) mod slot;

//! valetd as a library: everything the `valetd` binary does, reachable from tests.

mod admin;
mod approvals;
mod audit_sink;
mod aws;
mod broker;
mod convert;
mod error;
mod gateway_broker;
mod https;
mod keys;
mod layers;
mod loader;
mod redactor;
mod server;
mod sts;
mod valet;
mod webhook;

pub use error::ServerError;
pub use loader::Overrides;
pub use server::{LogFormat, Options, init_logging, run};

//! Valet's rules, with no I/O and no async runtime: the config model and its validation, scope
//! evaluation, the grant lifecycle, token signing and verification, the key ring and the audit
//! chain. Everything here is unit-testable without a network or a disk.

pub mod approval;
pub mod audit;
pub mod aws;
pub mod call;
pub mod canonical;
pub mod clock;
pub mod config;
pub mod console;
pub mod explain;
pub mod grant;
pub mod graphql;
pub mod identity;
pub mod ids;
pub mod json;
pub mod keyring;
pub mod mcp;
pub mod policy;
pub mod random;
pub mod rate;
pub mod rules;
pub mod secret;
pub mod token;

pub use clock::{Clock, FakeClock, SystemClock, UnixTime};
pub use ids::{ApprovalId, GrantId, KeyId, TaskId};
pub use secret::Secret;

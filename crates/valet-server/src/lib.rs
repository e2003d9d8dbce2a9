//! valetd as a library: the gRPC adapters around valet-service, the layers every RPC passes
//! through, the web console, the outbound HTTP client, and the wiring that starts it all. Everything the `valetd`
//! binary does is reachable from tests.

mod admin;
mod broker;
mod connections;
mod console;
mod convert;
mod error;
mod layers;
mod metrics;
mod outbound;
mod server;
mod telemetry;

pub use error::ServerError;
pub use server::{LogFormat, Options, run};
pub use telemetry::init_logging;
pub use valet_service::Overrides;

//! End-to-end tests: real valetd processes on loopback, driven through valet-client and the CLI.

mod abuse;
mod admin;
mod approvals;
mod audit_trust;
mod aws;
mod bad_input;
mod bench;
mod cli;
mod client_scenarios;
mod console;
mod differential;
mod disk_full;
mod distributed;
mod gateway;
mod identity;
mod lifecycle;
mod mcp;
mod metrics;
mod protocol;
mod refusals;
mod restart;
mod secrets;
mod startup;
mod tls;
mod tour;
mod traces;

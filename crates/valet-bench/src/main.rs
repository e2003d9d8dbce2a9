//! `valet-bench`: starts a real valetd (and its baselines) on loopback, drives each scenario, and
//! prints throughput, latency percentiles, errors and the ratio against a baseline measured in
//! the same run — on these shared machines only ratios compare across runs.

mod hostile;
mod load;
mod processes;
mod report;
mod scenarios;

use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(name = "valet-bench", version)]
struct Arguments {
    #[command(subcommand)]
    command: Option<Helper>,
    /// The scenario to run.
    #[arg(value_enum, default_value = "all")]
    scenario: Scenario,
    /// Concurrent streams (default: 1, 16 and 64 for `issue`; 64 elsewhere).
    #[arg(long)]
    concurrency: Option<usize>,
    /// How long each measurement runs.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    duration: Duration,
    /// How long the churn scenario runs.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    churn_duration: Duration,
    /// One JSON object per scenario on stdout.
    #[arg(long)]
    json: bool,
    /// A few hundred requests per scenario, checking only that there are no errors (for CI).
    #[arg(long)]
    smoke: bool,
    /// Also write the results as Markdown to this file (docs/benchmarks.md).
    #[arg(long)]
    write_doc: Option<std::path::PathBuf>,
    /// Criterion output to include in the written document.
    #[arg(long)]
    micro: Option<std::path::PathBuf>,
    /// The store valetd runs on: `sled` (embedded) or `etcd` (three local members, started and
    /// stopped by the run; Debian's etcd-server).
    #[arg(long, value_enum, default_value = "sled")]
    store: scenarios::StoreKind,
    /// `hostile` only: run just the attacks whose name contains this text (such as "held").
    #[arg(long)]
    attack: Option<String>,
}

/// Helper processes the tool starts as baselines (not for people to run).
#[derive(Debug, Subcommand)]
enum Helper {
    #[command(hide = true)]
    ServeEcho { address: String },
    #[command(hide = true)]
    ServeUpstream { address: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    All,
    Issue,
    /// Issuing over TLS, with a key and with a workload identity token, against plaintext.
    IssueIdentity,
    Introspect,
    VerifyOffline,
    Gateway,
    /// MCP tool calls through the gateway against the same MCP server called directly.
    Mcp,
    /// Valet issuing and introspecting against OpenBao (raft storage, file audit device) minting
    /// and looking up tokens, in the same run.
    Peer,
    Revoke,
    Churn,
    /// A legitimate client under each attack of a hostile caller (idle and half-sent
    /// connections, idle HTTP/2, refused calls with huge queries, bad tokens from rotating
    /// addresses, held approval-gated MCP calls, console posts without a session, fresh grants
    /// on a stdio MCP server), against the same client unattacked.
    Hostile,
}

fn main() {
    let arguments = Arguments::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("valet-bench: cannot start the async runtime: {error}");
            std::process::exit(1);
        }
    };
    let outcome = runtime.block_on(async {
        match arguments.command {
            Some(Helper::ServeEcho { address }) => {
                processes::serve_echo(&address).await.map(|_| true)
            }
            Some(Helper::ServeUpstream { address }) => {
                processes::serve_upstream(&address).await.map(|_| true)
            }
            None => {
                let options = scenarios::Options {
                    concurrency: arguments.concurrency,
                    duration: if arguments.smoke {
                        Duration::from_millis(300)
                    } else {
                        arguments.duration
                    },
                    churn_duration: if arguments.smoke {
                        Duration::from_secs(2)
                    } else {
                        arguments.churn_duration
                    },
                    smoke: arguments.smoke,
                    json: arguments.json,
                    write_doc: arguments.write_doc.clone(),
                    micro: arguments.micro.clone(),
                    store: arguments.store,
                    attack: arguments.attack.clone(),
                };
                scenarios::run(arguments.scenario, &options).await
            }
        }
    });
    match outcome {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(error) => {
            eprintln!("valet-bench: {error:#}");
            std::process::exit(1);
        }
    }
}

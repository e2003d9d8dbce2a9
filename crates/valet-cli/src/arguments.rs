//! The command line's shape: every command, flag and help text, in one clap definition that also
//! generates the shell completions and the man page.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use valet_core::audit::ChainHead;

/// The Valet command line: request, inspect and revoke task-scoped tokens, and wrap commands in them.
#[derive(Debug, Parser)]
#[command(
    name = "valet",
    version,
    after_help = "Exit codes: 0 ok, 1 failure, 2 usage, 3 denied, 4 unreachable.\n\
                  Environment: VALET_SERVER (default http://127.0.0.1:7470), VALET_KEY (the principal key),\n\
                  VALET_CA_FILE, VALET_CLIENT_CERT and VALET_CLIENT_KEY (TLS)."
)]
pub struct Arguments {
    #[command(flatten)]
    pub connection: Connection,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct Connection {
    /// The valetd address.
    #[arg(long, global = true, env = "VALET_SERVER", default_value = valet_client::DEFAULT_SERVER)]
    pub server: String,
    /// Read the principal key from this file instead of VALET_KEY.
    #[arg(long, global = true)]
    pub key_file: Option<PathBuf>,
    /// The CA bundle (PEM) that verifies valetd's certificate for an https:// server; the
    /// system's roots when unset.
    #[arg(long, global = true, env = "VALET_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// A client certificate (PEM) for mTLS: authenticates a principal configured with
    /// [[principal.certificate]], or satisfies `client_auth = "required"`.
    #[arg(
        long,
        global = true,
        env = "VALET_CLIENT_CERT",
        requires = "client_key"
    )]
    pub client_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(
        long,
        global = true,
        env = "VALET_CLIENT_KEY",
        requires = "client_cert"
    )]
    pub client_key: Option<PathBuf>,
    /// Print data as JSON.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Request, renew, revoke, introspect and verify tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Act on all grants of a task.
    #[command(subcommand)]
    Task(TaskCommand),
    /// List and watch grants.
    #[command(subcommand)]
    Grants(GrantsCommand),
    /// Revoke every active grant of a principal, scope or environment (operators).
    RevokeAll(RevokeAllArguments),
    /// Signing keys (admins).
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Check a config file offline, or make valetd reload its config (admins).
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Make a new principal key and print its [[principal]] stanza.
    Keygen {
        /// The principal's name.
        #[arg(long)]
        name: String,
    },
    /// Verify and read the audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// See and follow approval requests.
    #[command(subcommand)]
    Approvals(ApprovalsCommand),
    /// Approve a pending request (operators, admins, or its listed approvers; never its requester).
    Approve {
        id: String,
        /// The value the request asks to be typed (its environment, or a parameter's value).
        #[arg(long)]
        confirm: Option<String>,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Deny a pending request, with a reason.
    Deny {
        id: String,
        #[arg(long)]
        reason: String,
    },
    /// Run a command with a task-scoped token in its environment; revoke the task when it exits.
    Exec(ExecArguments),
    /// Print shell completions.
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff).
    Man,
}

#[derive(Debug, Args)]
pub struct TokenRequestArguments {
    #[arg(long)]
    pub scope: String,
    #[arg(long)]
    pub task: String,
    #[arg(long, default_value = "")]
    pub purpose: String,
    /// Lifetime such as 5m (default: the scope's default).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub ttl: Option<Duration>,
    /// A scope parameter, NAME=VALUE; repeat for more.
    #[arg(long = "param", value_parser = parse_param)]
    pub params: Vec<(String, String)>,
    /// For scopes that need approval: how long to wait for it (default 15m).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "15m")]
    pub wait: Duration,
    /// For scopes that need approval: do not wait; print the approval id and exit 3.
    #[arg(long, conflicts_with = "wait")]
    pub no_wait: bool,
}

#[derive(Debug, Subcommand)]
pub enum ApprovalsCommand {
    /// Pending requests (all requests with --all), oldest first.
    List {
        #[arg(long)]
        all: bool,
    },
    /// One request in full: what exactly is asked, by whom, and who has decided.
    Show { id: String },
    /// Requests as they arrive and change (Ctrl-C to stop).
    Watch,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Request a token: prints only the token on stdout, the grant on stderr.
    Request(TokenRequestArguments),
    /// Renew a grant: a later expiry within its max lifetime, and a fresh token on stdout.
    Renew {
        grant: String,
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
    },
    /// Revoke one grant.
    Revoke {
        grant: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Ask valetd whether a token is active (TOKEN, or - or nothing for stdin). Exit 3 if not.
    Introspect { token: Option<String> },
    /// Verify a token offline against valetd's public keys (TOKEN, or - or nothing for stdin).
    Verify {
        token: Option<String>,
        /// The audience the token must be for.
        #[arg(long)]
        audience: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum TaskCommand {
    /// Revoke every grant of a task.
    Revoke {
        task: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[derive(Debug, Args, Clone, Default)]
pub struct GrantFilterArguments {
    #[arg(long)]
    pub principal: Option<String>,
    #[arg(long)]
    pub task: Option<String>,
    #[arg(long)]
    pub scope: Option<String>,
    #[arg(long)]
    pub environment: Option<String>,
    /// active, revoked, expired or pending.
    #[arg(long, value_parser = ["active", "revoked", "expired", "pending"])]
    pub status: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum GrantsCommand {
    /// List grants, oldest first.
    List(GrantFilterArguments),
    /// Stream grant changes as they happen (Ctrl-C to stop).
    Watch(GrantFilterArguments),
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false, id = "target")]
pub struct RevokeAllTarget {
    #[arg(long)]
    pub principal: Option<String>,
    #[arg(long)]
    pub scope: Option<String>,
    #[arg(long)]
    pub environment: Option<String>,
}

#[derive(Debug, Args)]
pub struct RevokeAllArguments {
    #[command(flatten)]
    pub target: RevokeAllTarget,
    /// Why; recorded on every revoked grant and in the audit log.
    #[arg(long)]
    pub reason: String,
    /// Do not ask for confirmation (for scripts).
    #[arg(long)]
    pub yes: bool,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Make a new signing key current; the old one verifies until its tokens expire.
    Rotate,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate a config file as valetd would at start: the file, then everything it points at
    /// (the key-encryption key, credentials, TLS, JWKS and etcd files and variables). Prints every
    /// problem with its key path, then warnings. Exit 0 only if valetd would start.
    Check {
        /// The config file.
        file: PathBuf,
        /// Check only the file: read none of the files and variables it points at (for a machine
        /// other than valetd's).
        #[arg(long)]
        offline: bool,
        /// Check as `valetd --dev` would: a missing [seal] is allowed.
        #[arg(long)]
        dev: bool,
    },
    /// Make valetd re-read its config file.
    Reload,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check an audit log and report the first bad record: its chain from the first record (or a
    /// rotation checkpoint) to the head valetd recorded, every record's MAC (with the
    /// key-encryption key), and its signed checkpoints (with the public keys).
    Verify {
        file: PathBuf,
        /// The chain head valetd keeps (SEQUENCE:HASH): the chain must end exactly there.
        #[arg(long, conflicts_with = "fetch_head")]
        head: Option<ChainHead>,
        /// Ask valetd for the chain head and its public keys (operators).
        #[arg(long)]
        fetch_head: bool,
        /// The public keys (a JWKS document, as served at /.well-known/jwks.json) that signed
        /// the checkpoints, for an auditor without access to valetd.
        #[arg(long)]
        jwks: Option<PathBuf>,
        /// The key-encryption key file: every record's MAC is checked (whoever holds this key
        /// controls valetd; keep this for the operators who do).
        #[arg(long)]
        seal_key_file: Option<PathBuf>,
    },
    /// Print the chain head valetd keeps, as SEQUENCE:HASH (operators).
    Head,
    /// Print the latest audit records (operators).
    Tail {
        /// How many of the latest records.
        #[arg(long, default_value_t = 20)]
        last: u32,
        /// Keep printing records as they are written.
        #[arg(long)]
        follow: bool,
    },
}

#[derive(Debug, Args)]
pub struct ExecArguments {
    #[arg(long)]
    pub scope: String,
    #[arg(long)]
    pub task: String,
    #[arg(long, default_value = "")]
    pub purpose: String,
    /// Lifetime such as 5m (default: the scope's default). Renewed while the command runs.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub ttl: Option<Duration>,
    /// A scope parameter, NAME=VALUE; repeat for more.
    #[arg(long = "param", value_parser = parse_param)]
    pub params: Vec<(String, String)>,
    /// The environment variable that carries the token.
    #[arg(long, default_value = "VALET_TOKEN")]
    pub env_name: String,
    /// The command and its arguments.
    #[arg(required = true, last = true)]
    pub command: Vec<String>,
}

fn parse_param(text: &str) -> Result<(String, String), String> {
    let (name, value) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not NAME=VALUE"))?;
    Ok((name.to_string(), value.to_string()))
}

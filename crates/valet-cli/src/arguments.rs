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
    after_help = "Exit codes: 0 ok, 1 failure, 2 usage, 3 denied, 4 unreachable, 141 stdout closed.\n\
                  Environment: VALET_SERVER (default http://127.0.0.1:7470); the credential, first found of\n\
                  VALET_KEY, VALET_IDENTITY_TOKEN_FILE, the GitHub Actions runner's token\n\
                  (ACTIONS_ID_TOKEN_REQUEST_URL), a client certificate (VALET_CLIENT_CERT, VALET_CLIENT_KEY);\n\
                  VALET_CA_FILE for TLS; NO_COLOR.\n\
                  Examples:\n  valet whoami\n  valet token request --scope deploy-staging --task t1 --param project=web\n  valet exec --scope deploy-staging --task t1 --param project=web -- ./deploy.sh\n  valet grants list --status active"
)]
pub struct Arguments {
    #[command(flatten)]
    pub connection: Connection,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Connection options (every command)")]
pub struct Connection {
    /// The valetd address: https://HOST:PORT (TLS), or http://HOST:PORT for a plaintext loopback
    /// listener.
    #[arg(long, global = true, env = "VALET_SERVER", hide_env_values = true, default_value = valet_client::DEFAULT_SERVER)]
    pub server: String,
    /// Read the principal key from this file instead of VALET_KEY.
    #[arg(long, global = true)]
    pub key_file: Option<PathBuf>,
    /// The CA bundle (PEM) that verifies valetd's certificate for an https:// server; the
    /// system's roots when unset.
    #[arg(long, global = true, env = "VALET_CA_FILE", hide_env_values = true)]
    pub ca_file: Option<PathBuf>,
    /// A client certificate (PEM) for mTLS: authenticates a principal configured with
    /// [[principal.certificate]], or satisfies `client_auth = "required"`.
    #[arg(
        long,
        global = true,
        env = "VALET_CLIENT_CERT",
        hide_env_values = true,
        requires = "client_key"
    )]
    pub client_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(
        long,
        global = true,
        env = "VALET_CLIENT_KEY",
        hide_env_values = true,
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
    /// Check, test and explain a config file offline, or make valetd reload its config (admins).
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Make a new principal key: the key alone on stdout, its [[principal]] stanza on stderr.
    #[command(
        after_help = "Example:\n  valet keygen --name ci-agent > ci-agent.key    # the stanza to add to valetd's config goes to the terminal"
    )]
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
    #[command(
        after_help = "Examples:\n  valet approvals show ap_01m85j…     # read exactly what will run, first\n  valet approve ap_01m85j… --confirm staging --reason \"ticket OPS-42\""
    )]
    Approve {
        /// The approval request's id (from `valet approvals list`, or the agent's error).
        id: String,
        /// The value the request asks to be typed (its environment, or a parameter's value).
        #[arg(long)]
        confirm: Option<String>,
        /// Why it is approved; recorded in the audit log.
        #[arg(long, default_value = "", hide_default_value = true)]
        reason: String,
    },
    /// Deny a pending request, with a reason.
    Deny {
        /// The approval request's id.
        id: String,
        /// Why it is denied; the requester is told.
        #[arg(long)]
        reason: String,
    },
    /// Run a command with a task-scoped token in its environment; revoke the task when it exits.
    #[command(after_help = EXEC_AFTER_HELP)]
    Exec(ExecArguments),
    /// Which principal the current credential is, its roles and scopes, how it authenticated, and
    /// which server said so.
    Whoami,
    /// Open the web console in a browser, logged in as this principal (operators): valetd makes a
    /// single-use login link good for a minute, which opens a session only with the code shown
    /// here; list and end console sessions.
    #[command(
        after_help = "Examples:\n  valet console                  # opens the browser (xdg-open, or $BROWSER); type the code shown here\n  valet console --print-url      # prints the link instead; open it within a minute, once\n  valet console sessions         # the sessions open, with the credential each was opened with\n  valet console end 3f2a…        # ends one, on every replica"
    )]
    Console {
        /// Print the login link instead of opening a browser (the code is shown on stderr). The
        /// link opens a session only with the code: a copy of the link elsewhere opens nothing.
        #[arg(long)]
        print_url: bool,
        #[command(subcommand)]
        action: Option<ConsoleCommand>,
    },
    /// Print shell completions.
    #[command(after_help = "Example:\n  valet completions bash > /etc/bash_completion.d/valet")]
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), or write one page per command into a directory.
    #[command(
        after_help = "Examples:\n  valet man | man -l -\n  valet man --out-dir /usr/local/share/man/man1"
    )]
    Man {
        /// Write valet.1 and one page per subcommand (valet-token-request.1, …) here.
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
pub struct TokenRequestArguments {
    /// The scope to request (what the token may do; the config defines scopes).
    #[arg(long)]
    pub scope: String,
    /// The task the token is for: revoking the task revokes every grant it holds.
    #[arg(long)]
    pub task: String,
    /// Why, in words; recorded on the grant and in the audit log, and shown to approvers.
    #[arg(long, default_value = "", hide_default_value = true)]
    pub purpose: String,
    /// Lifetime such as 5m (default: the scope's default).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub ttl: Option<Duration>,
    /// A scope parameter, NAME=VALUE; repeat for more.
    #[arg(long = "param", value_parser = parse_param)]
    pub params: Vec<(String, String)>,
    /// For scopes that need approval: how long to wait for a decision (default: until the
    /// request expires, as the scope's approval timeout says).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub wait: Option<Duration>,
    /// For scopes that need approval: do not wait; print the approval id and exit 3.
    #[arg(long, conflicts_with = "wait")]
    pub no_wait: bool,
}

#[derive(Debug, Subcommand)]
pub enum ApprovalsCommand {
    /// Pending requests (all requests with --all), oldest first.
    List {
        /// Also decided, expired and withdrawn requests.
        #[arg(long)]
        all: bool,
    },
    /// One request in full: what exactly is asked, by whom, and who has decided.
    Show {
        /// The approval request's id.
        id: String,
    },
    /// Requests as they arrive and change (Ctrl-C to stop).
    Watch,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Request a token: prints only the token on stdout, the grant on stderr.
    #[command(
        after_help = "Examples:\n  TOKEN=$(valet token request --scope railway-staging-domains --task fix-dns-42 \\\n          --param project=shop --purpose \"add custom domain\" --ttl 5m)\n  valet token request --scope github-read --task ci-7 --param repository=acme/web --json\n  eval \"$(valet token request --scope reports-read --task q3 --param team=blue)\"   # aws-sts"
    )]
    Request(TokenRequestArguments),
    /// Renew a grant: a later expiry within its max lifetime, and a fresh token on stdout.
    Renew {
        /// The grant's id.
        grant: String,
        /// The new lifetime from now, such as 10m (default: the scope's default).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
    },
    /// Revoke one grant.
    Revoke {
        /// The grant's id.
        grant: String,
        /// Why; recorded on the grant and in the audit log.
        #[arg(long, default_value = "", hide_default_value = true)]
        reason: String,
    },
    /// Wait again for a grant that waits for approval (after `--no-wait`, or a wait that ended);
    /// prints its token once it is approved. Exit 3 if denied, expired or still pending.
    Wait {
        /// The pending grant's id (`valet token request` printed it).
        grant: String,
        /// How long to wait at most (default: until the request is decided or expires).
        #[arg(long, value_parser = humantime::parse_duration)]
        wait: Option<Duration>,
    },
    /// Ask valetd whether a token is active (TOKEN, or - or nothing for stdin). Exit 3 if not.
    Introspect {
        /// The token; `-` or nothing reads it from stdin.
        token: Option<String>,
    },
    /// Verify a token's signature and times offline against valetd's public keys (TOKEN, or - or
    /// nothing for stdin). Offline, it cannot see a revocation: `introspect` can.
    Verify {
        /// The token; `-` or nothing reads it from stdin.
        token: Option<String>,
        /// The audience the token must be for.
        #[arg(long)]
        audience: Option<String>,
        /// Verify against this JWKS file (as served at /.well-known/jwks.json) instead of asking
        /// valetd: no server and no credential needed.
        #[arg(long, requires = "issuer")]
        jwks: Option<PathBuf>,
        /// The issuer the token must carry (valetd's server.issuer); with --jwks.
        #[arg(long, requires = "jwks")]
        issuer: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum TaskCommand {
    /// Revoke every grant of a task.
    Revoke {
        /// The task id the grants were requested for.
        task: String,
        /// Why; recorded on every grant and in the audit log.
        #[arg(long, default_value = "", hide_default_value = true)]
        reason: String,
    },
}

#[derive(Debug, Args, Clone, Default)]
pub struct GrantFilterArguments {
    /// Only this principal's grants (agents see only their own anyway).
    #[arg(long)]
    pub principal: Option<String>,
    /// Only this task's grants.
    #[arg(long)]
    pub task: Option<String>,
    /// Only grants of this scope.
    #[arg(long)]
    pub scope: Option<String>,
    /// Only grants in this environment.
    #[arg(long)]
    pub environment: Option<String>,
    /// active, revoked, expired or pending.
    #[arg(long, value_parser = ["active", "revoked", "expired", "pending"])]
    pub status: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum GrantsCommand {
    /// List grants, oldest first.
    #[command(
        after_help = "Examples:\n  valet grants list --status active --environment production\n  valet grants list --task deploy-43 --json"
    )]
    List(GrantFilterArguments),
    /// Stream grant changes as they happen (Ctrl-C to stop).
    Watch(GrantFilterArguments),
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false, id = "target")]
pub struct RevokeAllTarget {
    /// Every active grant of this principal.
    #[arg(long)]
    pub principal: Option<String>,
    /// Every active grant of this scope.
    #[arg(long)]
    pub scope: Option<String>,
    /// Every active grant in this environment.
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
pub enum ConsoleCommand {
    /// The console sessions open now on every replica: who, opened with which credential, until
    /// when, and whether that credential is still accepted.
    Sessions,
    /// End a console session (as `valet console sessions` lists it) on every replica.
    End {
        /// The session's id.
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate a config file as valetd would at start: the file, then everything it points at
    /// (the key-encryption key, credentials, TLS, JWKS and etcd files and variables). Prints every
    /// problem with its key path, then what widens access (lints: warnings, or errors with
    /// --strict). Exit 0 only if valetd would start (and, with --strict, nothing is flagged).
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
        /// Treat every finding of the lints (what widens access, what can never work) as an
        /// error, unless silenced in the config with allow_broad = "reason".
        #[arg(long)]
        strict: bool,
    },
    /// Make valetd re-read its config file.
    Reload,
    /// Run policy test cases (a TOML file of [[case]]s) against a config: token requests, gateway
    /// calls, and who may reach an environment. Exit 1 if any case fails. Offline.
    #[command(
        after_help = "Example:\n  valet config test deploy/examples/railway.test.toml\nThe case format is in docs/policy.md."
    )]
    Test {
        /// The case file.
        file: PathBuf,
        /// The config to test (default: the case file's `config`, relative to it).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// What a principal may request and what its grants allow, read from a config file; with
    /// --call, whether the gateway would forward one concrete call (decided by the gateway's own
    /// rules code). Offline.
    #[command(
        after_help = "Examples:\n  valet config explain deploy/examples/railway.toml --principal maintenance-agent\n  valet config explain deploy/examples/railway.toml --principal maintenance-agent \\\n      --scope railway-production-maintenance --param project_id=2f9c6a1e-4b7d-4c1a-9e3f-5a6b7c8d9e0f \\\n      --call 'POST /graphql/v2' --body delete-volume.json"
    )]
    Explain {
        /// The config file.
        file: PathBuf,
        /// The principal to explain.
        #[arg(long)]
        principal: String,
        /// Only this scope (needed with --call).
        #[arg(long)]
        scope: Option<String>,
        /// A grant parameter, NAME=VALUE; repeat for more (renders AWS session policies and
        /// binds rules).
        #[arg(long = "param", value_parser = parse_param)]
        params: Vec<(String, String)>,
        /// A concrete call, "METHOD /path?query", decided as the gateway would.
        #[arg(long, requires = "scope")]
        call: Option<String>,
        /// The call's body, from this file.
        #[arg(long, requires = "call")]
        body: Option<PathBuf>,
        /// The call's Content-Type (application/json when a body is given).
        #[arg(long, requires = "call")]
        content_type: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check an audit log and report the first bad record: its chain from the first record (or a
    /// rotation checkpoint) to the head valetd recorded, every record's MAC (with the
    /// key-encryption key), and its signed checkpoints (with the public keys).
    Verify {
        /// The audit log file (JSON lines).
        file: PathBuf,
        /// A chain head valetd kept (SEQUENCE:HASH): the chain must hold it (reach its sequence
        /// with its hash); records after it are counted as written after it was read.
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
    /// The scope to request for the command.
    #[arg(long)]
    pub scope: String,
    /// The task the command is: its grants are revoked when it exits.
    #[arg(long)]
    pub task: String,
    /// Why, in words; recorded on the grant and shown to approvers.
    #[arg(long, default_value = "", hide_default_value = true)]
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
    /// For scopes that need approval: how long to wait for a decision; undecided by then, the
    /// command is not run and the request is withdrawn (default: until the request expires).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub wait: Option<Duration>,
    /// The command and its arguments.
    #[arg(required = true, last = true)]
    pub command: Vec<String>,
}

/// What `valet exec --help` says after the options.
const EXEC_AFTER_HELP: &str = "The command's environment:
  VALET_TOKEN (or --env-name)  the grant's token, renewed while the command runs
  VALET_GRANT                  the grant's id
  VALET_TOKEN_FILE             a 0600 file that always holds the current token
  AWS_* variables              for an aws-sts scope, the grant's STS credentials
The principal's own credentials (VALET_KEY, VALET_IDENTITY_TOKEN_FILE, VALET_CLIENT_CERT,
VALET_CLIENT_KEY, the GitHub runner's ACTIONS_ID_TOKEN_REQUEST_*) are removed: the command can
request, renew or revoke nothing.

Exit status: the command's own; 126 if it cannot be run, 127 if it is not found, 128+N if a
signal N ended it; valet's own codes (1 failure, 2 usage, 3 denied, 4 unreachable) when no token
was issued.

Examples:
  valet exec --scope railway-staging-domains --task deploy-43 --param project=shop -- ./deploy.sh
  valet exec --scope github-read --task ci-7 --param repository=acme/web --env-name GH_TOKEN -- gh pr list";

fn parse_param(text: &str) -> Result<(String, String), String> {
    let (name, value) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not NAME=VALUE"))?;
    Ok((name.to_string(), value.to_string()))
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Arguments;

    /// Every command, depth first, with its full name (`valet token request`).
    fn every_command() -> Vec<(String, clap::Command)> {
        fn walk(command: &clap::Command, name: String, into: &mut Vec<(String, clap::Command)>) {
            into.push((name.clone(), command.clone()));
            for sub in command.get_subcommands().filter(|sub| !sub.is_hide_set()) {
                walk(sub, format!("{name} {}", sub.get_name()), into);
            }
        }
        let mut command = Arguments::command().disable_help_subcommand(true);
        command.build();
        let mut commands = Vec::new();
        walk(&command, "valet".to_string(), &mut commands);
        commands
    }

    #[test]
    fn every_command_and_argument_says_what_it_is() {
        let mut missing = Vec::new();
        for (name, command) in every_command() {
            if command.get_about().is_none() {
                missing.push(format!("{name} has no description"));
            }
            for argument in command.get_arguments() {
                let id = argument.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                if argument
                    .get_help()
                    .is_none_or(|help| help.to_string().is_empty())
                {
                    missing.push(format!("{name}: argument {id} has no help text"));
                }
            }
            let help = command.clone().render_help().to_string();
            if help.contains("[default: \"\"]") || help.contains("[default: ]") {
                missing.push(format!("{name} shows an empty default"));
            }
        }
        assert!(missing.is_empty(), "{}", missing.join("\n"));
    }

    #[test]
    fn the_help_of_every_command() {
        for (name, command) in every_command() {
            let help = command.clone().render_help().to_string();
            insta::assert_snapshot!(format!("help_{}", name.replace(' ', "_")), help);
        }
    }
}

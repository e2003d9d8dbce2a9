//! The commands of `valet`, each a function from parsed arguments to output and an exit code.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use valet_client::{Client, ClientConfig, ClientError, TokenRequest, v1};
use valet_core::Secret;
use valet_core::audit::{self, ChainHead};
use valet_core::clock::format_time;
use valet_core::config::Config;

pub const EXIT_FAILURE: i32 = 1;
pub const EXIT_DENIED: i32 = 3;
pub const EXIT_UNREACHABLE: i32 = 4;

/// The Valet command line: request, inspect and revoke task-scoped tokens.
#[derive(Debug, Parser)]
#[command(
    name = "valet",
    version,
    after_help = "Exit codes: 0 ok, 1 failure, 2 usage, 3 denied, 4 unreachable.\n\
                  Environment: VALET_SERVER (default http://127.0.0.1:7470), VALET_KEY (the principal key)."
)]
pub struct Arguments {
    #[command(flatten)]
    connection: Connection,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct Connection {
    /// The valetd address.
    #[arg(long, global = true, env = "VALET_SERVER", default_value = valet_client::DEFAULT_SERVER)]
    server: String,
    /// Read the principal key from this file instead of VALET_KEY.
    #[arg(long, global = true)]
    key_file: Option<PathBuf>,
    /// Print data as JSON.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Request, renew, revoke, introspect and verify tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Act on all grants of a task.
    #[command(subcommand)]
    Task(TaskCommand),
    /// List grants.
    #[command(subcommand)]
    Grants(GrantsCommand),
    /// Revoke every active grant of a principal, scope or environment.
    RevokeAll(RevokeAllArguments),
    /// Signing keys (admin).
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Check a config file offline, or make valetd reload its config (admin).
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Make a new principal key and print its config stanza.
    Keygen {
        /// The principal's name.
        #[arg(long)]
        name: String,
    },
    /// Verify the audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Request a token: prints only the token on stdout, the grant on stderr.
    Request {
        #[arg(long)]
        scope: String,
        #[arg(long)]
        task: String,
        #[arg(long, default_value = "")]
        purpose: String,
        /// Lifetime such as 5m (default: the scope's default).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// A scope parameter, NAME=VALUE; repeat for more.
        #[arg(long = "param", value_parser = parse_param)]
        params: Vec<(String, String)>,
    },
    /// Renew a grant: prints the fresh token.
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
    /// Ask valetd whether a token is active (TOKEN or - for stdin).
    Introspect { token: Option<String> },
    /// Verify a token offline against valetd's public keys (TOKEN or - for stdin).
    Verify {
        token: Option<String>,
        #[arg(long)]
        audience: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum TaskCommand {
    /// Revoke every grant of a task.
    Revoke {
        task: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[derive(Debug, Subcommand)]
enum GrantsCommand {
    /// List grants, oldest first.
    List {
        #[arg(long)]
        principal: Option<String>,
        #[arg(long)]
        task: Option<String>,
        #[arg(long)]
        scope: Option<String>,
        #[arg(long)]
        environment: Option<String>,
        /// active, revoked, expired or pending.
        #[arg(long)]
        status: Option<String>,
    },
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false, id = "target")]
struct RevokeAllTarget {
    #[arg(long)]
    principal: Option<String>,
    #[arg(long)]
    scope: Option<String>,
    #[arg(long)]
    environment: Option<String>,
}

#[derive(Debug, Args)]
struct RevokeAllArguments {
    #[command(flatten)]
    target: RevokeAllTarget,
    /// Why; recorded on every revoked grant and in the audit log.
    #[arg(long)]
    reason: String,
    /// Do not ask for confirmation.
    #[arg(long)]
    yes: bool,
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Make a new signing key current; the old one verifies until its tokens expire.
    Rotate,
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate a config file offline; prints every problem with its key path.
    Check { file: PathBuf },
    /// Make valetd re-read its config file.
    Reload,
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Check an audit log's hash chain and report the first bad record.
    Verify {
        file: PathBuf,
        /// The chain head valetd keeps (SEQUENCE:HASH), to detect a cut tail.
        #[arg(long, conflicts_with = "fetch_head")]
        head: Option<ChainHead>,
        /// Ask valetd for the chain head (needs an operator key).
        #[arg(long)]
        fetch_head: bool,
    },
    /// Print the chain head valetd keeps, as SEQUENCE:HASH.
    Head,
}

fn parse_param(text: &str) -> Result<(String, String), String> {
    let (name, value) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not NAME=VALUE"))?;
    Ok((name.to_string(), value.to_string()))
}

/// Runs one command; returns the exit code.
pub async fn run(arguments: Arguments) -> anyhow::Result<i32> {
    let connection = &arguments.connection;
    match arguments.command {
        Command::Config(ConfigCommand::Check { file }) => config_check(&file),
        Command::Keygen { name } => keygen(&name, connection.json),
        Command::Audit(AuditCommand::Verify {
            file,
            head,
            fetch_head,
        }) => {
            let head = match (head, fetch_head) {
                (Some(head), _) => Some(head),
                (None, true) => Some(fetch_audit_head(&connect(connection).await?).await?),
                (None, false) => None,
            };
            audit_verify(&file, head.as_ref(), connection.json)
        }
        command => {
            let client = connect(connection).await?;
            online(command, &client, connection.json).await
        }
    }
}

async fn online(command: Command, client: &Client, json: bool) -> anyhow::Result<i32> {
    match command {
        Command::Token(TokenCommand::Request {
            scope,
            task,
            purpose,
            ttl,
            params,
        }) => {
            let mut request = TokenRequest::new(scope, task).with_purpose(purpose);
            request.ttl = ttl;
            request.params = params.into_iter().collect();
            let issued = client.request_token(request).await?;
            print_issued(&issued, json);
        }
        Command::Token(TokenCommand::Renew { grant, ttl }) => {
            print_issued(&client.renew(&grant, ttl).await?, json)
        }
        Command::Token(TokenCommand::Revoke { grant, reason }) => {
            let grant = client.revoke(&grant, &reason).await?;
            print_grants(&[grant], json);
        }
        Command::Token(TokenCommand::Introspect { token }) => {
            let token = token_argument(token)?;
            let reply = client
                .introspect(token.expose_str().unwrap_or_default())
                .await?;
            if json {
                let value = serde_json::json!({"active": reply.active, "reason": reply.reason, "grant": reply.grant.as_ref().map(grant_json)});
                println!("{value}");
            } else {
                println!("active: {}", reply.active);
                if !reply.reason.is_empty() {
                    println!("reason: {}", reply.reason);
                }
                if let Some(grant) = &reply.grant {
                    print_grants(std::slice::from_ref(grant), false);
                }
            }
            return Ok(if reply.active { 0 } else { EXIT_DENIED });
        }
        Command::Token(TokenCommand::Verify { token, audience }) => {
            let token = token_argument(token)?;
            match client
                .verify_offline(token.expose_str().unwrap_or_default(), audience.as_deref())
                .await
            {
                Ok(claims) => {
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({"valid": true, "claims": claims_json(&claims)})
                        );
                    } else {
                        println!(
                            "valid: grant {} for {} (scope {}, task {}), expires {}",
                            claims.jti,
                            claims.sub,
                            claims.scope,
                            claims.task,
                            format_time(claims.exp)
                        );
                    }
                }
                Err(ClientError::Verify(error)) => {
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({"valid": false, "reason": error.to_string()})
                        );
                    } else {
                        println!("invalid: {error}");
                    }
                    return Ok(EXIT_DENIED);
                }
                Err(error) => return Err(error.into()),
            }
        }
        Command::Task(TaskCommand::Revoke { task, reason }) => {
            let revoked = client.revoke_task(&task, &reason).await?;
            if json {
                println!("{}", serde_json::json!({"task": task, "revoked": revoked}));
            } else {
                println!("revoked {} grant(s) of task {task}", revoked.len());
            }
        }
        Command::Grants(GrantsCommand::List {
            principal,
            task,
            scope,
            environment,
            status,
        }) => {
            let status = match status.as_deref() {
                None => v1::GrantStatus::Unspecified,
                Some("active") => v1::GrantStatus::Active,
                Some("revoked") => v1::GrantStatus::Revoked,
                Some("expired") => v1::GrantStatus::Expired,
                Some("pending") => v1::GrantStatus::Pending,
                Some(other) => bail!(
                    "--status {other:?} is not a grant status; use active, revoked, expired or pending"
                ),
            };
            let filter = v1::GrantFilter {
                principal: principal.unwrap_or_default(),
                task_id: task.unwrap_or_default(),
                scope: scope.unwrap_or_default(),
                environment: environment.unwrap_or_default(),
                status: status as i32,
            };
            let mut grants = Vec::new();
            let mut page_token = String::new();
            loop {
                let page = client
                    .admin()
                    .list_grants(v1::ListGrantsRequest {
                        filter: Some(filter.clone()),
                        page_size: 1000,
                        page_token,
                    })
                    .await
                    .map_err(ClientError::from)?
                    .into_inner();
                grants.extend(page.grants);
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            print_grants(&grants, json);
        }
        Command::RevokeAll(arguments) => {
            let (target, name) = match arguments.target {
                RevokeAllTarget {
                    principal: Some(name),
                    ..
                } => (
                    v1::revoke_all_request::Target::Principal(name.clone()),
                    name,
                ),
                RevokeAllTarget {
                    scope: Some(name), ..
                } => (v1::revoke_all_request::Target::Scope(name.clone()), name),
                RevokeAllTarget {
                    environment: Some(name),
                    ..
                } => (
                    v1::revoke_all_request::Target::Environment(name.clone()),
                    name,
                ),
                _ => bail!("name one target: --principal, --scope or --environment"),
            };
            if !arguments.yes {
                confirm(&name)?;
            }
            let reply = client
                .admin()
                .revoke_all(v1::RevokeAllRequest {
                    target: Some(target),
                    reason: arguments.reason,
                })
                .await
                .map_err(ClientError::from)?
                .into_inner();
            if json {
                println!("{}", serde_json::json!({"revoked": reply.n_revoked}));
            } else {
                println!("revoked {} grant(s)", reply.n_revoked);
            }
        }
        Command::Keys(KeysCommand::Rotate) => {
            let reply = client
                .admin()
                .rotate_signing_key(v1::RotateSigningKeyRequest {})
                .await
                .map_err(ClientError::from)?
                .into_inner();
            if json {
                println!(
                    "{}",
                    serde_json::json!({"new_key_id": reply.new_key_id, "retired_key_id": reply.retired_key_id})
                );
            } else {
                println!(
                    "signing key is now {} (retired {}, which verifies until its tokens expire)",
                    reply.new_key_id, reply.retired_key_id
                );
            }
        }
        Command::Config(ConfigCommand::Reload) => {
            let reply = client
                .admin()
                .reload_config(v1::ReloadConfigRequest {})
                .await
                .map_err(ClientError::from)?
                .into_inner();
            println!(
                "config reloaded: {} principals, {} scopes, {} credentials",
                reply.n_principals, reply.n_scopes, reply.n_credentials
            );
        }
        Command::Audit(AuditCommand::Head) => println!("{}", fetch_audit_head(client).await?),
        Command::Config(ConfigCommand::Check { .. })
        | Command::Keygen { .. }
        | Command::Audit(AuditCommand::Verify { .. }) => {
            unreachable!("offline commands are handled before connecting")
        }
    }
    Ok(0)
}

async fn connect(connection: &Connection) -> anyhow::Result<Client> {
    let key = match &connection.key_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the key file {}", path.display()))?;
            Secret::from(text.trim().to_string())
        }
        None => match std::env::var(valet_client::KEY_ENV) {
            Ok(key) if !key.trim().is_empty() => Secret::from(key.trim().to_string()),
            _ => return Err(ClientError::NoKey.into()),
        },
    };
    Ok(Client::connect(ClientConfig::new(connection.server.clone(), key)).await?)
}

async fn fetch_audit_head(client: &Client) -> anyhow::Result<ChainHead> {
    let reply = client
        .admin()
        .get_audit_head(v1::GetAuditHeadRequest {})
        .await
        .map_err(ClientError::from)?
        .into_inner();
    Ok(ChainHead {
        sequence: reply.sequence,
        hash: reply.hash,
    })
}

fn token_argument(token: Option<String>) -> anyhow::Result<Secret> {
    match token.as_deref() {
        None | Some("-") => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("cannot read the token from stdin")?;
            Ok(Secret::from(text.trim().to_string()))
        }
        Some(text) => Ok(Secret::from(text.trim().to_string())),
    }
}

fn confirm(name: &str) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    if !std::io::stdin().is_terminal() {
        bail!("revoke-all needs confirmation: run it on a terminal, or pass --yes in scripts");
    }
    eprint!("This revokes every active grant of {name:?}. Type {name:?} to confirm: ");
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    if answer.trim() != name {
        bail!("not confirmed; nothing was revoked");
    }
    Ok(())
}

fn print_issued(issued: &valet_client::IssuedToken, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::json!({"token": issued.token_str(), "grant": grant_json(&issued.grant)})
        );
    } else {
        println!("{}", issued.token_str());
        let grant = &issued.grant;
        eprintln!(
            "grant {} for task {} (scope {}, environment {}), expires {}",
            grant.id,
            grant.task_id,
            grant.scope,
            grant.environment,
            grant
                .expires_at
                .as_ref()
                .map(|at| format_time(at.seconds))
                .unwrap_or_default()
        );
    }
}

fn status_name(status: i32) -> &'static str {
    match v1::GrantStatus::try_from(status).unwrap_or(v1::GrantStatus::Unspecified) {
        v1::GrantStatus::Pending => "pending",
        v1::GrantStatus::Active => "active",
        v1::GrantStatus::Revoked => "revoked",
        v1::GrantStatus::Expired => "expired",
        v1::GrantStatus::Denied => "denied",
        v1::GrantStatus::Unspecified => "unknown",
    }
}

fn grant_json(grant: &v1::Grant) -> serde_json::Value {
    let time = |at: &Option<prost_types::Timestamp>| at.as_ref().map(|at| format_time(at.seconds));
    serde_json::json!({
        "id": grant.id,
        "principal": grant.principal,
        "task": grant.task_id,
        "purpose": grant.purpose,
        "scope": grant.scope,
        "environment": grant.environment,
        "audience": grant.audience,
        "params": grant.params.iter().collect::<BTreeMap<_, _>>(),
        "issued_at": time(&grant.issued_at),
        "expires_at": time(&grant.expires_at),
        "max_expires_at": time(&grant.max_expires_at),
        "uses": grant.uses,
        "max_uses": (grant.max_uses > 0).then_some(grant.max_uses),
        "status": status_name(grant.status),
        "status_reason": (!grant.status_reason.is_empty()).then_some(&grant.status_reason),
        "key_id": grant.key_id,
    })
}

fn claims_json(claims: &valet_client::Claims) -> serde_json::Value {
    serde_json::json!({
        "iss": claims.iss, "sub": claims.sub, "aud": claims.aud, "iat": claims.iat, "nbf": claims.nbf,
        "exp": claims.exp, "jti": claims.jti, "task": claims.task, "scope": claims.scope, "env": claims.env,
        "params": claims.params,
    })
}

fn print_grants(grants: &[v1::Grant], json: bool) {
    if json {
        println!(
            "{}",
            serde_json::Value::Array(grants.iter().map(grant_json).collect())
        );
        return;
    }
    println!(
        "ID                          PRINCIPAL         TASK                  SCOPE                     ENV         EXPIRES                USES  STATUS"
    );
    for grant in grants {
        println!(
            "{:<26}  {:<16}  {:<20}  {:<24}  {:<10}  {:<20}  {:>5}  {}",
            grant.id,
            grant.principal,
            grant.task_id,
            grant.scope,
            grant.environment,
            grant
                .expires_at
                .as_ref()
                .map(|at| format_time(at.seconds))
                .unwrap_or_default(),
            grant.uses,
            status_name(grant.status)
        );
    }
}

fn config_check(file: &Path) -> anyhow::Result<i32> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let base_dir = file
        .canonicalize()
        .ok()
        .and_then(|path| path.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("."));
    match Config::parse(&text, &base_dir) {
        Ok(config) => {
            println!(
                "{} is valid: {} principals, {} scopes, {} credentials",
                file.display(),
                config.principals.len(),
                config.scopes.len(),
                config.credentials.len()
            );
            Ok(0)
        }
        Err(errors) => {
            println!("{}: {errors}", file.display());
            Ok(EXIT_FAILURE)
        }
    }
}

fn keygen(name: &str, json: bool) -> anyhow::Result<i32> {
    if !valet_core::config::is_valid_name(name) {
        bail!(
            "{name:?} is not a valid principal name; use {}",
            valet_core::config::NAME_RULE
        );
    }
    let random: [u8; 32] = valet_core::random::bytes()?;
    let key = Secret::from(format!("vk_{}", hex::encode(random)));
    let hash = hex::encode(key.sha256());
    let key_text = key.expose_str().unwrap_or_default();
    if json {
        println!(
            "{}",
            serde_json::json!({"name": name, "key": key_text, "key_sha256": hash})
        );
    } else {
        eprintln!(
            "The key below is shown once. Give it to the principal (as VALET_KEY); valetd keeps only its hash."
        );
        println!("{key_text}");
        eprintln!(
            "\n[[principal]]\nname = \"{name}\"\nroles = [\"agent\"]\nkey_sha256 = \"{hash}\"\nscopes = []"
        );
    }
    Ok(0)
}

fn audit_verify(file: &Path, head: Option<&ChainHead>, json: bool) -> anyhow::Result<i32> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    match audit::verify(text.lines(), head) {
        Ok(summary) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({"valid": true, "records": summary.n_records, "head": summary.head.to_string()})
                );
            } else {
                println!(
                    "{}: chain intact, {} records, head {}",
                    file.display(),
                    summary.n_records,
                    summary.head
                );
            }
            Ok(0)
        }
        Err(broken) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({"valid": false, "line": broken.line, "reason": broken.to_string()})
                );
            } else {
                println!("{}: chain broken at {broken}", file.display());
            }
            Ok(EXIT_FAILURE)
        }
    }
}

/// The exit code for an error: denied and unreachable have their own codes.
pub fn exit_code_of(error: &anyhow::Error) -> i32 {
    match error.downcast_ref::<ClientError>() {
        Some(ClientError::Unreachable { .. }) => EXIT_UNREACHABLE,
        Some(client_error) => match client_error.code() {
            Some(
                tonic::Code::PermissionDenied
                | tonic::Code::Unauthenticated
                | tonic::Code::FailedPrecondition,
            ) => EXIT_DENIED,
            Some(tonic::Code::Unavailable) => EXIT_UNREACHABLE,
            _ => EXIT_FAILURE,
        },
        None => EXIT_FAILURE,
    }
}

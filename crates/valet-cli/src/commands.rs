//! The commands: each takes parsed arguments, talks to valetd where it must, prints, and returns
//! an exit code.

use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::CommandFactory;
use tokio_stream::StreamExt;
use valet_client::{Client, ClientConfig, ClientError, Credential, IssuedToken, TokenRequest, v1};
use valet_core::audit::{self, ChainHead};
use valet_core::clock::format_time;
use valet_core::config::Config;
use valet_core::{Clock, Secret, SystemClock};

use crate::arguments::{
    ApprovalsCommand, Arguments, AuditCommand, Command, ConfigCommand, Connection, ConsoleCommand,
    GrantFilterArguments, GrantsCommand, KeysCommand, RevokeAllArguments, TaskCommand,
    TokenCommand, TokenRequestArguments,
};
use crate::output::{self, EXIT_DENIED, EXIT_FAILURE, Style, UsageError};

/// Runs one command; returns the exit code.
pub async fn run(arguments: Arguments) -> anyhow::Result<i32> {
    let connection = &arguments.connection;
    let json = connection.json;
    match arguments.command {
        Command::Config(ConfigCommand::Check {
            file,
            offline,
            dev,
            strict,
        }) => config_check(&file, (offline, dev, strict), json),
        Command::Config(ConfigCommand::Explain {
            file,
            principal,
            scope,
            params,
            call,
            body,
            content_type,
        }) => config_explain(
            &file,
            (&principal, scope.as_deref()),
            &params.into_iter().collect(),
            call.as_deref()
                .map(|call| (call, body.as_deref(), content_type.as_deref())),
            json,
        ),
        Command::Config(ConfigCommand::Test { file, config }) => {
            config_test(&file, config.as_deref(), json)
        }
        Command::Token(TokenCommand::Verify {
            token,
            audience,
            jwks: Some(jwks),
            issuer,
        }) => {
            let issuer = issuer.ok_or_else(|| {
                UsageError(
                    "--jwks needs --issuer: the issuer valetd's tokens carry (its server.issuer)"
                        .into(),
                )
            })?;
            verify_with_jwks(token, audience.as_deref(), (&jwks, &issuer), json)
        }
        Command::Keygen { name } => keygen(&name, json),
        Command::Completions { shell } => {
            // Made in memory, then written: a closed stdout is then an error, not a panic.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Arguments::command(), "valet", &mut script);
            std::io::Write::write_all(&mut std::io::stdout(), &script)?;
            Ok(0)
        }
        Command::Man { out_dir } => crate::manual::man_pages(out_dir.as_deref()),
        Command::Audit(AuditCommand::Verify {
            file,
            head,
            fetch_head,
            jwks,
            seal_key_file,
        }) => {
            let mut public_keys = match &jwks {
                Some(path) => jwks_file(path)?,
                None => std::collections::BTreeMap::new(),
            };
            let head = match (head, fetch_head) {
                (Some(head), _) => Some(head),
                (None, true) => {
                    let client = connect(connection).await?;
                    let served = client
                        .broker()
                        .get_jwks(v1::GetJwksRequest {})
                        .await
                        .map_err(ClientError::from)?
                        .into_inner();
                    for key in served.keys {
                        if let Some(public) = public_key_of(&key.x) {
                            public_keys.insert(key.kid, public);
                        }
                    }
                    Some(fetch_audit_head(&client).await?)
                }
                (None, false) => None,
            };
            let chain_key = match &seal_key_file {
                Some(path) => {
                    let text = std::fs::read_to_string(path)
                        .with_context(|| format!("cannot read {}", path.display()))?;
                    let seal_key = valet_core::keyring::SealKey::from_base64(&Secret::from(text))
                        .with_context(|| {
                        format!("{} is not a key-encryption key", path.display())
                    })?;
                    Some(audit::ChainKey::from_seal_key(&seal_key))
                }
                None => None,
            };
            audit_verify(&file, head.as_ref(), &public_keys, chain_key.as_ref(), json)
        }
        Command::Exec(arguments) => crate::exec::exec(&connect(connection).await?, arguments).await,
        command => online(command, &connect(connection).await?, json).await,
    }
}

async fn online(command: Command, client: &Client, json: bool) -> anyhow::Result<i32> {
    let now = SystemClock.now();
    match command {
        Command::Token(TokenCommand::Request(arguments)) => {
            let wait = crate::waiting::WaitFor {
                limit: arguments.wait,
                no_wait: arguments.no_wait,
            };
            let issued = client.request_token(token_request(arguments)).await?;
            match crate::waiting::until_decided(client, issued, wait, json).await? {
                Ok(issued) => print_issued(&issued, json, now),
                Err(code) => return Ok(code),
            }
        }
        Command::Token(TokenCommand::Wait { grant, wait }) => {
            eprintln!("waiting for a decision on grant {grant}…");
            let limit = wait.unwrap_or(std::time::Duration::from_secs(24 * 3600));
            match crate::waiting::wait_in_turns(client, &grant, limit).await {
                Ok(issued) => print_issued(&issued, json, now),
                Err(ClientError::StillPending { .. }) => {
                    eprintln!("still waiting for a decision; run `valet token wait {grant}` again");
                    return Ok(EXIT_DENIED);
                }
                Err(error) => return Err(error.into()),
            }
        }
        Command::Token(TokenCommand::Renew { grant, ttl }) => {
            print_issued(&client.renew(&grant, ttl).await?, json, now)
        }
        Command::Token(TokenCommand::Revoke { grant, reason }) => {
            let revoked = client.revoke(&grant, &reason).await?;
            if json {
                let mut object = output::grant_json(&revoked.grant);
                if let Some(notice) = &revoked.notice {
                    object["notice"] = serde_json::json!(notice);
                }
                println!("{object}");
            } else {
                println!("{}", output::grant_summary(&revoked.grant, now));
                if let Some(notice) = &revoked.notice {
                    eprintln!("{notice}");
                }
            }
        }
        Command::Token(TokenCommand::Introspect { token }) => {
            let token = token_argument(token)?;
            let reply = client
                .introspect(token.expose_str().unwrap_or_default())
                .await?;
            if json {
                let grant = reply.grant.as_ref().map(output::grant_json);
                println!(
                    "{}",
                    serde_json::json!({"active": reply.active, "reason": (!reply.reason.is_empty()).then_some(&reply.reason), "grant": grant})
                );
            } else {
                println!("active: {}", reply.active);
                if !reply.reason.is_empty() {
                    println!("reason: {}", output::escape_for_people(&reply.reason));
                }
                if let Some(grant) = &reply.grant {
                    println!("{}", output::grant_summary(grant, now));
                }
            }
            return Ok(if reply.active { 0 } else { EXIT_DENIED });
        }
        Command::Token(TokenCommand::Verify {
            token, audience, ..
        }) => {
            let token = token_argument(token)?;
            let verified = match client
                .verify_offline(token.expose_str().unwrap_or_default(), audience.as_deref())
                .await
            {
                Ok(claims) => Ok(claims),
                Err(ClientError::Verify(error)) => Err(error),
                Err(error) => return Err(error.into()),
            };
            return Ok(print_verification(verified, json));
        }
        Command::Task(TaskCommand::Revoke { task, reason }) => {
            let revoked = client.revoke_task(&task, &reason).await?;
            if json {
                println!("{}", serde_json::json!({"task": task, "revoked": revoked}));
            } else {
                println!("revoked {} grant(s) of task {task}", revoked.len());
            }
        }
        Command::Grants(GrantsCommand::List(filter)) => {
            let grants = list_all(client, grant_filter(&filter)).await?;
            if json {
                println!(
                    "{}",
                    serde_json::Value::Array(grants.iter().map(output::grant_json).collect())
                );
            } else {
                print!("{}", output::grant_table(&grants, now, Style::of_stdout()));
            }
        }
        Command::Grants(GrantsCommand::Watch(filter)) => {
            let grants = crate::watching::Grants {
                filter: grant_filter(&filter),
                json,
            };
            crate::watching::follow(client, &grants).await?
        }
        Command::RevokeAll(arguments) => return revoke_all(client, arguments, json).await,
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
                    "signing key is now {}; {} is retired and verifies until its tokens expire",
                    reply.new_key_id, reply.retired_key_id
                );
            }
        }
        Command::Config(ConfigCommand::Reload) => {
            let reply = match client
                .admin()
                .reload_config(v1::ReloadConfigRequest {})
                .await
            {
                Ok(reply) => reply.into_inner(),
                // A config valetd cannot apply is a failure to fix, not a refusal: exit 1.
                Err(status) if status.code() == tonic::Code::FailedPrecondition => {
                    return Err(output::Failed(status.message().to_string()).into());
                }
                Err(status) => return Err(ClientError::from(status).into()),
            };
            if json {
                println!(
                    "{}",
                    serde_json::json!({"principals": reply.n_principals, "scopes": reply.n_scopes, "credentials": reply.n_credentials, "grants_ended": reply.n_grants_ended, "grants_clamped": reply.n_grants_clamped, "restart_only": reply.restart_only})
                );
            } else {
                println!(
                    "config reloaded: {} principals, {} scopes, {} credentials",
                    reply.n_principals, reply.n_scopes, reply.n_credentials
                );
                if reply.n_grants_ended + reply.n_grants_clamped > 0 {
                    println!(
                        "live grants the new config no longer allows: {} ended, {} cut short (the audit log says which and why)",
                        reply.n_grants_ended, reply.n_grants_clamped
                    );
                }
                for key in &reply.restart_only {
                    println!("{key} changed: it takes effect at the next restart");
                }
            }
        }
        Command::Audit(AuditCommand::Head) => {
            let head = fetch_audit_head(client).await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"sequence": head.sequence, "hash": head.hash})
                );
            } else {
                println!("{head}");
            }
        }
        Command::Audit(AuditCommand::Tail { last, follow }) => {
            let mut records = client
                .admin()
                .audit_tail(v1::AuditTailRequest { last, follow })
                .await
                .map_err(ClientError::from)?
                .into_inner();
            while let Some(record) = records.next().await {
                // Records are JSON lines already: the same text for people and programs.
                println!("{}", record.map_err(ClientError::from)?.line);
            }
        }
        Command::Approvals(ApprovalsCommand::List { all }) => {
            let approvals = list_approvals(client, !all).await?;
            if json {
                println!(
                    "{}",
                    serde_json::Value::Array(approvals.iter().map(output::approval_json).collect())
                );
            } else {
                print!(
                    "{}",
                    output::approval_table(&approvals, now, Style::of_stdout())
                );
            }
        }
        Command::Approvals(ApprovalsCommand::Show { id }) => {
            let approval = client
                .admin()
                .get_approval(v1::GetApprovalRequest { id })
                .await
                .map_err(ClientError::from)?
                .into_inner();
            if json {
                println!("{}", output::approval_json(&approval));
            } else {
                print!("{}", output::approval_details(&approval, now));
            }
        }
        Command::Approvals(ApprovalsCommand::Watch) => {
            crate::watching::follow(client, &crate::watching::Approvals { json }).await?
        }
        Command::Approve {
            id,
            confirm,
            reason,
        } => {
            let approval = client
                .admin()
                .approve(v1::ApproveRequest {
                    id,
                    confirm: confirm.unwrap_or_default(),
                    reason,
                })
                .await
                .map_err(ClientError::from)?
                .into_inner();
            print_decision(&approval, json);
        }
        Command::Deny { id, reason } => {
            let approval = client
                .admin()
                .deny(v1::DenyRequest { id, reason })
                .await
                .map_err(ClientError::from)?
                .into_inner();
            print_decision(&approval, json);
        }
        Command::Whoami => {
            let me = client
                .broker()
                .who_am_i(v1::WhoAmIRequest {})
                .await
                .map_err(ClientError::from)?
                .into_inner();
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "server": client.server(),
                        "principal": me.principal,
                        "roles": me.roles,
                        "scopes": me.scopes,
                        "auth_method": me.auth_method,
                        "auth_subject": me.auth_subject,
                        "auth_issuer": me.auth_issuer,
                    })
                );
            } else {
                println!("principal  {}", me.principal);
                println!("roles      {}", me.roles.join(", "));
                println!(
                    "scopes     {}",
                    if me.scopes.is_empty() {
                        "(none)".to_string()
                    } else {
                        me.scopes.join(", ")
                    }
                );
                let how = match (me.auth_subject.as_str(), me.auth_issuer.as_str()) {
                    ("", _) => me.auth_method.clone(),
                    (subject, "") => format!("{} {subject}", me.auth_method),
                    (subject, issuer) => format!("{} {subject} (issuer {issuer})", me.auth_method),
                };
                println!("via        {how}");
                println!("server     {}", client.server());
            }
        }
        Command::Console {
            action: Some(ConsoleCommand::Sessions),
            ..
        } => {
            let sessions = client
                .admin()
                .list_console_sessions(v1::ListConsoleSessionsRequest {})
                .await
                .map_err(ClientError::from)?
                .into_inner()
                .sessions;
            if json {
                let rows: Vec<serde_json::Value> = sessions
                    .iter()
                    .map(|session| {
                        serde_json::json!({
                            "id": session.id,
                            "principal": session.principal,
                            "credential": session.credential,
                            "opened_at": crate::output::time_of(&session.opened_at),
                            "expires_at": crate::output::time_of(&session.expires_at),
                            "credential_refused": session.credential_refused,
                        })
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(rows));
            } else if sessions.is_empty() {
                println!("no console session is open");
            } else {
                for session in &sessions {
                    let standing = if session.credential_refused.is_empty() {
                        String::new()
                    } else {
                        format!(
                            "  (ends at its next request: {})",
                            session.credential_refused
                        )
                    };
                    println!(
                        "{}  {}  {}  until {}{standing}",
                        session.id,
                        session.principal,
                        session.credential,
                        crate::output::time_of(&session.expires_at)
                    );
                }
            }
        }
        Command::Console {
            action: Some(ConsoleCommand::End { id }),
            ..
        } => {
            client
                .admin()
                .end_console_session(v1::EndConsoleSessionRequest { id: id.clone() })
                .await
                .map_err(ClientError::from)?;
            if json {
                println!("{}", serde_json::json!({ "ended": id }));
            } else {
                println!("ended console session {id} on every replica");
            }
        }
        Command::Console {
            print_url,
            action: None,
        } => {
            let login = client
                .admin()
                .create_console_login(v1::CreateConsoleLoginRequest {})
                .await
                .map_err(ClientError::from)?
                .into_inner();
            let expires = crate::output::time_of(&login.expires_at);
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "url": login.url, "code": login.code, "expires_at": expires })
                );
            } else if print_url {
                println!("{}", login.url);
                eprintln!(
                    "single-use login link, valid until {expires}; the login page asks for this code: {}",
                    login.code
                );
            } else {
                open_in_browser(&login.url, &login.code, &expires);
            }
        }
        Command::Config(
            ConfigCommand::Check { .. }
            | ConfigCommand::Explain { .. }
            | ConfigCommand::Test { .. },
        )
        | Command::Keygen { .. }
        | Command::Audit(AuditCommand::Verify { .. })
        | Command::Exec(_)
        | Command::Completions { .. }
        | Command::Man { .. } => unreachable!("handled before connecting"),
    }
    Ok(0)
}

/// Opens `url` with `$BROWSER` or `xdg-open`; prints it when neither can (a server, an SSH
/// session), so the operator can open it where a browser runs. The code goes to the terminal
/// only: the browser's arguments are visible to every local user, and the link without the code
/// opens nothing.
fn open_in_browser(url: &str, code: &str, expires: &str) {
    let browser = std::env::var("BROWSER")
        .ok()
        .filter(|browser| !browser.trim().is_empty());
    let opener = browser.as_deref().unwrap_or("xdg-open");
    let opened = std::process::Command::new(opener)
        .arg(url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if opened {
        eprintln!(
            "opened the console with {opener}; type this code on its login page: {code}\n(the link works once, until {expires})"
        );
    } else {
        eprintln!(
            "could not open a browser with {opener}; open this single-use link yourself before {expires}, and type the code {code} on its login page:"
        );
        println!("{url}");
    }
}

pub fn token_request(arguments: TokenRequestArguments) -> TokenRequest {
    let mut request =
        TokenRequest::new(arguments.scope, arguments.task).with_purpose(arguments.purpose);
    request.ttl = arguments.ttl;
    request.params = arguments.params.into_iter().collect();
    request
}

/// Connects as the principal whose credential is given: `--key-file`, else the environment's
/// (`VALET_KEY`, `VALET_IDENTITY_TOKEN_FILE`, the GitHub Actions runner), else the client
/// certificate alone; over TLS for an https:// server.
pub async fn connect(connection: &Connection) -> anyhow::Result<Client> {
    let client_certificate = connection
        .client_cert
        .clone()
        .zip(connection.client_key.clone());
    let credential = match &connection.key_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the key file {}", path.display()))?;
            Credential::Key(Secret::from(text.trim().to_string()))
        }
        None => match Credential::from_env() {
            Some(credential) => credential,
            None if client_certificate.is_some() => Credential::ClientCertificate,
            None => return Err(ClientError::NoKey.into()),
        },
    };
    let config = ClientConfig::with_credential(connection.server.clone(), credential).with_tls(
        valet_client::TlsOptions {
            ca_file: connection.ca_file.clone(),
            client_certificate,
        },
    );
    Ok(Client::connect(config).await?)
}

fn grant_filter(arguments: &GrantFilterArguments) -> v1::GrantFilter {
    let status = match arguments.status.as_deref() {
        Some("active") => v1::GrantStatus::Active,
        Some("revoked") => v1::GrantStatus::Revoked,
        Some("expired") => v1::GrantStatus::Expired,
        Some("pending") => v1::GrantStatus::Pending,
        _ => v1::GrantStatus::Unspecified,
    };
    v1::GrantFilter {
        principal: arguments.principal.clone().unwrap_or_default(),
        task_id: arguments.task.clone().unwrap_or_default(),
        scope: arguments.scope.clone().unwrap_or_default(),
        environment: arguments.environment.clone().unwrap_or_default(),
        status: status as i32,
    }
}

pub async fn list_all(client: &Client, filter: v1::GrantFilter) -> anyhow::Result<Vec<v1::Grant>> {
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
            return Ok(grants);
        }
        page_token = page.next_page_token;
    }
}

/// Prints one grant change; `caught_up` when found in a listing after a reconnect.
pub fn print_grant_event(event: &v1::GrantEvent, json: bool, caught_up: bool) {
    let Some(grant) = &event.grant else { return };
    let kind =
        match v1::GrantEventKind::try_from(event.kind).unwrap_or(v1::GrantEventKind::Unspecified) {
            v1::GrantEventKind::Issued => "issued",
            v1::GrantEventKind::Renewed => "renewed",
            v1::GrantEventKind::Revoked => "revoked",
            v1::GrantEventKind::Used => "used",
            v1::GrantEventKind::Unspecified => "changed",
        };
    if json {
        println!(
            "{}",
            serde_json::json!({"event": kind, "caught_up": caught_up, "grant": output::grant_json(grant)})
        );
    } else {
        println!(
            "{} {kind:<8} {}",
            format_time(SystemClock.now()),
            output::grant_summary(grant, SystemClock.now())
        );
    }
}

/// Prints one approval request as it arrives or changes.
pub fn print_approval_event(approval: &v1::Approval, json: bool) {
    if json {
        println!("{}", output::approval_json(approval));
    } else {
        println!(
            "{} {:<9} {} — {}",
            format_time(SystemClock.now()),
            output::approval_status_name(approval.status),
            approval.id,
            approval.summary
        );
    }
}

/// Every approval request (pending ones only with `pending_only`), following every page.
pub async fn list_approvals(
    client: &Client,
    pending_only: bool,
) -> anyhow::Result<Vec<v1::Approval>> {
    let mut approvals = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .admin()
            .list_approvals(v1::ListApprovalsRequest {
                pending_only,
                page_size: 500,
                page_token: page_token.clone(),
            })
            .await
            .map_err(ClientError::from)?
            .into_inner();
        approvals.extend(page.approvals);
        if page.next_page_token.is_empty() {
            return Ok(approvals);
        }
        page_token = page.next_page_token;
    }
}

async fn revoke_all(
    client: &Client,
    arguments: RevokeAllArguments,
    json: bool,
) -> anyhow::Result<i32> {
    use v1::revoke_all_request::Target;
    let target = arguments.target;
    let (wire_target, kind, name) = if let Some(name) = target.principal {
        (Target::Principal(name.clone()), "principal", name)
    } else if let Some(name) = target.scope {
        (Target::Scope(name.clone()), "scope", name)
    } else if let Some(name) = target.environment {
        (Target::Environment(name.clone()), "environment", name)
    } else {
        return Err(
            UsageError("name one target: --principal, --scope or --environment".into()).into(),
        );
    };
    if !arguments.yes {
        if !std::io::stdin().is_terminal() {
            return Err(UsageError(
                "revoke-all needs confirmation: run it on a terminal, or pass --yes in scripts"
                    .into(),
            )
            .into());
        }
        let filter = v1::GrantFilter {
            principal: if kind == "principal" {
                name.clone()
            } else {
                String::new()
            },
            scope: if kind == "scope" {
                name.clone()
            } else {
                String::new()
            },
            environment: if kind == "environment" {
                name.clone()
            } else {
                String::new()
            },
            status: v1::GrantStatus::Active as i32,
            ..v1::GrantFilter::default()
        };
        let count = list_all(client, filter).await?.len();
        eprint!(
            "This revokes {count} active grant(s) of {kind} {name:?}. Type the {kind}'s name to confirm: "
        );
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        if answer.trim() != name {
            eprintln!("not confirmed; nothing was revoked");
            return Ok(EXIT_FAILURE);
        }
    }
    let reply = client
        .admin()
        .revoke_all(v1::RevokeAllRequest {
            target: Some(wire_target),
            reason: arguments.reason,
        })
        .await
        .map_err(ClientError::from)?
        .into_inner();
    if json {
        println!(
            "{}",
            serde_json::json!({"revoked": reply.n_revoked, kind: name})
        );
    } else {
        println!("revoked {} grant(s) of {kind} {name}", reply.n_revoked);
    }
    Ok(0)
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

/// Prints an offline verification; returns the exit code (3 when invalid).
fn print_verification(
    verified: Result<valet_client::Claims, valet_core::token::VerifyError>,
    json: bool,
) -> i32 {
    match verified {
        Ok(claims) if json => println!(
            "{}",
            serde_json::json!({"valid": true, "revocation_checked": false, "claims": claims_json(&claims)})
        ),
        Ok(claims) => {
            println!(
                "valid signature and times: grant {} for {} (scope {}, environment {}, task {}), expires {}",
                claims.jti,
                claims.sub,
                claims.scope,
                claims.env,
                claims.task,
                format_time(claims.exp)
            );
            eprintln!(
                "an offline check cannot see a revocation: `valet token introspect` asks valetd whether the grant is still active"
            );
        }
        Err(error) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({"valid": false, "reason": error.to_string()})
                );
            } else {
                println!("invalid: {error}");
            }
            return EXIT_DENIED;
        }
    }
    0
}

/// `valet token verify --jwks FILE --issuer ISSUER`: no server, no credential.
fn verify_with_jwks(
    token: Option<String>,
    audience: Option<&str>,
    (jwks, issuer): (&Path, &str),
    json: bool,
) -> anyhow::Result<i32> {
    let token = token_argument(token)?;
    let keys = jwks_file(jwks)?;
    if keys.is_empty() {
        return Err(UsageError(format!(
            "{} holds no Ed25519 key (a JWKS as valetd serves at /.well-known/jwks.json)",
            jwks.display()
        ))
        .into());
    }
    let verified = valet_core::token::verify(
        token.expose_str().unwrap_or_default(),
        &keys,
        valet_core::token::Expectations {
            issuer,
            audience,
            now: SystemClock.now(),
            leeway_seconds: 30,
        },
    );
    Ok(print_verification(verified, json))
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

/// The token alone on stdout (so `$(valet token request …)` works), the grant on stderr; or one
/// JSON object with both. For an aws-sts scope, stdout carries `export` lines for the AWS
/// credentials instead (so `eval "$(valet token request …)"` works), and the notice goes to stderr.
fn print_issued(issued: &IssuedToken, json: bool, now: valet_core::UnixTime) {
    if json {
        let mut object = serde_json::json!({"token": issued.token_str(), "grant": output::grant_json(&issued.grant)});
        if let Some(aws) = &issued.aws {
            let mut credentials: serde_json::Map<String, serde_json::Value> = aws
                .environment()
                .into_iter()
                .map(|(name, value)| (name.to_string(), serde_json::json!(value)))
                .collect();
            credentials.insert(
                "expires_at".into(),
                serde_json::json!(valet_core::clock::format_time(aws.expires_at)),
            );
            credentials.insert(
                "assumed_role_arn".into(),
                serde_json::json!(aws.assumed_role_arn),
            );
            credentials.insert("notice".into(), serde_json::json!(aws.notice));
            object["aws"] = serde_json::Value::Object(credentials);
        }
        println!("{object}");
        return;
    }
    match &issued.aws {
        Some(aws) => {
            for (name, value) in aws.environment() {
                println!("export {name}={}", shell_quote(&value));
            }
            eprintln!("{}", output::grant_summary(&issued.grant, now));
            eprintln!(
                "AWS session {} until {}. {}",
                aws.assumed_role_arn,
                valet_core::clock::format_time(aws.expires_at),
                aws.notice
            );
        }
        None if issued.token.is_empty() => {
            // An operator renewed another principal's grant: extended, and no token for them.
            eprintln!("{}", output::grant_summary(&issued.grant, now));
            eprintln!(
                "the grant was extended; its token goes only to the principal that asked for it"
            );
        }
        None => {
            println!("{}", issued.token_str());
            eprintln!("{}", output::grant_summary(&issued.grant, now));
        }
    }
}

/// Single-quotes `value` for a POSIX shell.
fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', "'\\''"))
}

fn print_decision(approval: &v1::Approval, json: bool) {
    if json {
        println!("{}", output::approval_json(approval));
    } else {
        let status = output::approval_status_name(approval.status);
        let detail = if approval.status_reason.is_empty() {
            format!(
                "{} of {} approval(s) so far",
                approval.approvals.len(),
                approval.required
            )
        } else {
            output::escape_for_people(&approval.status_reason)
        };
        println!("{} is {status}: {detail}", approval.id);
    }
}

fn claims_json(claims: &valet_client::Claims) -> serde_json::Value {
    serde_json::json!({
        "iss": claims.iss, "sub": claims.sub, "aud": claims.aud, "iat": claims.iat, "nbf": claims.nbf,
        "exp": claims.exp, "jti": claims.jti, "task": claims.task, "scope": claims.scope, "env": claims.env,
        "params": claims.params,
    })
}

/// The machine's files and environment variables, as the config's checks read them.
struct SystemEnvironment;

impl valet_core::config::Environment for SystemEnvironment {
    fn read(&self, path: &Path) -> Result<Vec<u8>, String> {
        std::fs::read(path).map_err(|error| error.to_string())
    }

    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }

    fn executable(&self, path: &Path) -> Result<(), String> {
        use std::os::unix::fs::PermissionsExt;
        let metadata = std::fs::metadata(path).map_err(|error| error.to_string())?;
        if !metadata.is_file() {
            return Err("it is not a file".into());
        }
        if metadata.permissions().mode() & 0o111 == 0 {
            return Err("it is not executable (no x permission)".into());
        }
        Ok(())
    }
}

fn config_check(
    file: &Path,
    (offline, dev, strict): (bool, bool, bool),
    json: bool,
) -> anyhow::Result<i32> {
    let (text, base_dir) = read_config_file(file)?;
    // The same two steps as valetd's start: the file, then (unless offline) what it points at.
    let checked = Config::parse(&text, &base_dir).and_then(|config| {
        let problems = if offline {
            // What needs nothing read: the listeners.
            config.server.plaintext_problems(dev)
        } else {
            config.check_environment(&SystemEnvironment, dev)
        };
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(valet_core::config::ConfigErrors(problems))
        }
    });
    let offline_note = "offline: the key-encryption key, credentials and the TLS, JWKS and etcd files and variables were not read; run without --offline where valetd runs to check them";
    match checked {
        Ok(config) => {
            let lints = config.lints();
            let (silenced, active): (Vec<_>, Vec<_>) =
                lints.iter().partition(|lint| lint.silenced.is_some());
            let failed = strict && !active.is_empty();
            if json {
                let lints: Vec<_> = lints
                    .iter()
                    .map(|lint| serde_json::json!({"key_path": lint.key_path, "code": lint.code, "risk": lint.risk, "fix": lint.fix, "silenced": lint.silenced}))
                    .collect();
                println!(
                    "{}",
                    serde_json::json!({"valid": !failed, "strict": strict, "offline": offline, "principals": config.principals.len(), "scopes": config.scopes.len(), "credentials": config.credentials.len(), "lints": lints})
                );
            } else {
                println!(
                    "{} is valid: {} principals, {} scopes, {} credentials",
                    file.display(),
                    config.principals.len(),
                    config.scopes.len(),
                    config.credentials.len()
                );
                if offline {
                    println!("{offline_note}");
                }
                let level = if strict { "error" } else { "warning" };
                for lint in &active {
                    println!(
                        "{level}: {} [{}]: {}\n  fix: {}",
                        lint.key_path, lint.code, lint.risk, lint.fix
                    );
                }
                if !silenced.is_empty() {
                    println!(
                        "{} finding(s) silenced by allow_broad, each with its reason (--json lists them)",
                        silenced.len()
                    );
                }
                if failed {
                    println!(
                        "--strict: {} finding(s) to fix or to silence with allow_broad = \"reason\"",
                        active.len()
                    );
                }
            }
            Ok(if failed { EXIT_FAILURE } else { 0 })
        }
        Err(errors) => {
            if json {
                let problems: Vec<_> =
                    errors.0.iter().map(|problem| serde_json::json!({"key_path": problem.key_path, "problem": problem.kind.to_string()})).collect();
                println!(
                    "{}",
                    serde_json::json!({"valid": false, "problems": problems})
                );
            } else {
                println!("{}: {errors}", file.display());
            }
            Ok(EXIT_FAILURE)
        }
    }
}

/// A config file's text, and the directory its relative paths are resolved against.
fn read_config_file(file: &Path) -> anyhow::Result<(String, PathBuf)> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let base_dir = file
        .canonicalize()
        .ok()
        .and_then(|path| path.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("."));
    Ok((text, base_dir))
}

/// Reads and validates a config file the way `config check` does (the file only).
fn parse_config_file(file: &Path) -> anyhow::Result<Config> {
    let (text, base_dir) = read_config_file(file)?;
    Ok(Config::parse(&text, &base_dir)
        .map_err(|errors| UsageError(format!("{}: {errors}", file.display())))?)
}

/// `valet config test`: every case, then a count; exit 1 on any failure.
fn config_test(file: &Path, config: Option<&Path>, json: bool) -> anyhow::Result<i32> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let cases = valet_core::explain::cases::parse(&text)
        .map_err(|error| UsageError(format!("{}: {error}", file.display())))?;
    let config_path = match (config, &cases.config) {
        (Some(path), _) => path.to_path_buf(),
        (None, Some(relative)) => file
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join(relative),
        (None, None) => {
            return Err(UsageError(format!(
                "{} names no config: add config = \"FILE\" to it, or pass --config",
                file.display()
            ))
            .into());
        }
    };
    let config = parse_config_file(&config_path)?;
    let outcomes = valet_core::explain::cases::run(&config, &cases);
    let n_failed = outcomes.iter().filter(|outcome| !outcome.passed).count();
    if json {
        let outcomes: Vec<_> = outcomes
            .iter()
            .map(|outcome| serde_json::json!({"name": outcome.name, "passed": outcome.passed, "detail": outcome.detail}))
            .collect();
        println!(
            "{}",
            serde_json::json!({"config": config_path.display().to_string(), "passed": n_failed == 0, "cases": outcomes})
        );
    } else {
        for outcome in &outcomes {
            println!(
                "{} {} — {}",
                if outcome.passed { "ok  " } else { "FAIL" },
                outcome.name,
                outcome.detail
            );
        }
        println!(
            "{} case(s) against {}: {} passed, {n_failed} failed",
            outcomes.len(),
            config_path.display(),
            outcomes.len() - n_failed
        );
    }
    Ok(if n_failed == 0 { 0 } else { EXIT_FAILURE })
}

/// A call to decide: "METHOD /path?query", and its body file and content type.
type CallToExplain<'a> = (&'a str, Option<&'a Path>, Option<&'a str>);

/// `valet config explain`: offline, from the file alone.
fn config_explain(
    file: &Path,
    (principal, scope): (&str, Option<&str>),
    params: &std::collections::BTreeMap<String, String>,
    call: Option<CallToExplain<'_>>,
    json: bool,
) -> anyhow::Result<i32> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let base_dir = file
        .canonicalize()
        .ok()
        .and_then(|path| path.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("."));
    let config = Config::parse(&text, &base_dir)
        .map_err(|errors| UsageError(format!("{}: {errors}", file.display())))?;
    let explanation =
        valet_core::explain::explain(&config, principal, scope, params).map_err(UsageError)?;
    let Some((call, body_file, content_type)) = call else {
        if json {
            println!("{}", serde_json::to_string(&explanation)?);
        } else {
            print!("{}", valet_core::explain::words(&explanation));
        }
        return Ok(0);
    };
    let (method, target) = call.trim().split_once(' ').ok_or_else(|| {
        UsageError(format!(
            "--call {call:?} is not \"METHOD /path\", such as \"POST /graphql/v2\""
        ))
    })?;
    let body = match body_file {
        Some(path) => std::fs::read(path)
            .with_context(|| format!("cannot read the body file {}", path.display()))?,
        None => Vec::new(),
    };
    let content_type = content_type.or((!body.is_empty()).then_some("application/json"));
    let scope_name = scope.unwrap_or_default();
    let scope = config
        .scopes
        .get(scope_name)
        .ok_or_else(|| UsageError(format!("scope {scope_name:?} is not in this config")))?;
    let verdict = valet_core::explain::explain_call(
        scope,
        params,
        method,
        target.trim(),
        content_type,
        &body,
    );
    if json {
        println!("{}", serde_json::to_string(&verdict)?);
    } else {
        match &verdict {
            valet_core::explain::CallVerdict::Allow { rule } => {
                println!("allow: {rule} forwards {method} {}", target.trim())
            }
            valet_core::explain::CallVerdict::NeedsApproval { rule, approval } => {
                println!("needs approval: {rule} forwards it only once approved ({approval})")
            }
            valet_core::explain::CallVerdict::Deny { reason } => println!("deny: {reason}"),
        }
    }
    Ok(match verdict {
        valet_core::explain::CallVerdict::Allow { .. } => 0,
        _ => EXIT_DENIED,
    })
}

fn keygen(name: &str, json: bool) -> anyhow::Result<i32> {
    if !valet_core::config::is_valid_name(name) {
        return Err(UsageError(format!(
            "{name:?} is not a valid principal name; use {}",
            valet_core::config::NAME_RULE
        ))
        .into());
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
        // The key alone on stdout (`valet keygen --name x > x.key`); the rest for the person.
        println!("{key_text}");
        let where_the_key_is = if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
            "The key above is shown once"
        } else {
            "The key went to standard output, once"
        };
        eprintln!(
            "{where_the_key_is}: give it to the principal as VALET_KEY. valetd keeps only its hash.\n\
             Add this to valetd's config (choose its roles and scopes):\n\n\
             [[principal]]\nname = \"{name}\"\nroles = [\"agent\"]\nkey_sha256 = \"{hash}\"\nscopes = []"
        );
    }
    Ok(0)
}

fn audit_verify(
    file: &Path,
    head: Option<&ChainHead>,
    public_keys: &std::collections::BTreeMap<String, [u8; 32]>,
    chain_key: Option<&audit::ChainKey>,
    json: bool,
) -> anyhow::Result<i32> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let lookup = |kid: &str| public_keys.get(kid).copied();
    let verification = audit::Verification {
        key: chain_key,
        public_keys: (!public_keys.is_empty())
            .then_some(&lookup as &dyn Fn(&str) -> Option<[u8; 32]>),
        expected_head: head,
    };
    match audit::verify_with(text.lines(), &verification) {
        Ok(summary) => {
            // Say plainly what was proven, and what was not.
            let authenticated = if summary.macs_checked {
                "every record's MAC checks under the key-encryption key".to_string()
            } else if let Some(through) = summary.attested_through {
                format!(
                    "signed checkpoints attest the chain through record {through}; the {} records after it are chained but not yet attested",
                    summary.head.sequence.saturating_sub(through)
                )
            } else if public_keys.is_empty() {
                "not authenticated: the structure only (give --fetch-head, --jwks or --seal-key-file to check who wrote it)".to_string()
            } else {
                "not authenticated: no checkpoint in it verifies with the keys given".to_string()
            };
            let start = if summary.first_sequence <= 1 {
                "from the first record".to_string()
            } else {
                format!(
                    "from record {}, opened by a rotation checkpoint",
                    summary.first_sequence
                )
            };
            let end = match head {
                Some(head) if summary.n_after_head > 0 => format!(
                    "to the head valetd recorded (record {}), then {} record{} written after that head was read (chained to it, not covered by it)",
                    head.sequence,
                    summary.n_after_head,
                    if summary.n_after_head == 1 { "" } else { "s" }
                ),
                Some(_) => "to the head valetd recorded".to_string(),
                None => "to its last record (no recorded head given)".to_string(),
            };
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "valid": true,
                        "records": summary.n_records,
                        "head": summary.head.to_string(),
                        "first_sequence": summary.first_sequence,
                        "macs_checked": summary.macs_checked,
                        "attested_through": summary.attested_through,
                        "unverified_checkpoints": summary.n_unverified_checkpoints,
                        "matches_recorded_head": head.is_some(),
                        "after_head": summary.n_after_head,
                    })
                );
            } else {
                println!(
                    "{}: chain intact {start} {end}, {} records, head {}; {authenticated}",
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

/// Public keys from a JWKS document, by kid.
fn jwks_file(path: &Path) -> anyhow::Result<std::collections::BTreeMap<String, [u8; 32]>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let document: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a JWKS document", path.display()))?;
    Ok(document["keys"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|key| {
            Some((
                key["kid"].as_str()?.to_string(),
                public_key_of(key["x"].as_str()?)?,
            ))
        })
        .collect())
}

/// An Ed25519 public key from a JWK's `x` (base64url).
fn public_key_of(x: &str) -> Option<[u8; 32]> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(x)
        .ok()?
        .try_into()
        .ok()
}

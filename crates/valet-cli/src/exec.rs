//! `valet exec`: run a command with a task-scoped token, keep the token alive while the command
//! runs, and revoke the task when the command ends — however it ends.
//!
//! The token reaches the command as an environment variable (default `VALET_TOKEN`), with the
//! grant id in `VALET_GRANT`. An environment cannot change once a process runs, so renewals are
//! written to the file named by `VALET_TOKEN_FILE` (mode 0600, in a 0700 directory, replaced
//! atomically); long-running commands should read the token from there. For an aws-sts scope the
//! STS credentials are in `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN` and
//! `AWS_REGION`, so the AWS CLI and SDKs work unchanged. The principal's own credential
//! (`VALET_KEY`, and every other variable in `valet_client::PRINCIPAL_CREDENTIAL_ENV`) is removed
//! from the command's environment.

use std::io::{IsTerminal, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::Context;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::Instant;
use valet_client::{Client, ClientError, IssuedToken, TokenRequest};
use valet_core::{Clock, SystemClock};

use crate::arguments::ExecArguments;
use crate::output::{EXIT_FAILURE, UsageError};

/// Runs the command; returns its exit code (128 + N when a signal N ended it).
pub async fn exec(client: &Client, arguments: ExecArguments) -> anyhow::Result<i32> {
    if !is_env_name(&arguments.env_name) {
        return Err(UsageError(format!(
            "--env-name {:?} is not an environment variable name: letters, digits and '_', not starting with a digit",
            arguments.env_name
        ))
        .into());
    }
    // Catch signals before anything is issued, so an interruption at any moment still revokes.
    let mut signals = Signals::install()?;
    let outcome = tokio::select! {
        issued = obtain_token(client, &arguments) => match issued {
            Ok(Ok(issued)) => run_with_token(client, &arguments, &issued, signals).await,
            Ok(Err(code)) => {
                eprintln!("valet: the command was not run; its request is withdrawn with the task");
                Ok(code)
            }
            Err(error) => Err(error),
        },
        Some(signal) = signals.receiver.recv() => Ok(128 + signal as i32),
    };
    let revoked = client
        .revoke_task(&arguments.task, "valet exec: the command ended")
        .await;
    match (outcome, revoked) {
        (Ok(code), Ok(_)) => Ok(code),
        (Err(error), Ok(_)) => Err(error),
        (outcome, Err(error)) => {
            eprintln!(
                "valet: could not revoke task {} after the command ended ({error}); revoke it with `valet task revoke {}`",
                arguments.task, arguments.task
            );
            outcome.map(|_| EXIT_FAILURE)
        }
    }
}

/// The token, once issued (after approval when the scope asks for one); `Err(code)` when the
/// request was still undecided when the wait ended.
async fn obtain_token(
    client: &Client,
    arguments: &ExecArguments,
) -> anyhow::Result<Result<IssuedToken, i32>> {
    let mut request =
        TokenRequest::new(&arguments.scope, &arguments.task).with_purpose(&arguments.purpose);
    request.ttl = arguments.ttl;
    request.params = arguments.params.iter().cloned().collect();
    let issued = client.request_token(request).await?;
    let wait = crate::waiting::WaitFor {
        limit: arguments.wait,
        no_wait: false,
    };
    crate::waiting::until_decided(client, issued, wait, false).await
}

/// The signals valet forwards, caught from the start and delivered in order.
struct Signals {
    receiver: tokio::sync::mpsc::UnboundedReceiver<Signal>,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
        let kinds = [
            (SignalKind::interrupt(), Signal::SIGINT),
            (SignalKind::quit(), Signal::SIGQUIT),
            (SignalKind::terminate(), Signal::SIGTERM),
            (SignalKind::hangup(), Signal::SIGHUP),
            (SignalKind::user_defined1(), Signal::SIGUSR1),
            (SignalKind::user_defined2(), Signal::SIGUSR2),
        ];
        for (kind, name) in kinds {
            let mut stream = signal(kind)?;
            let sender = sender.clone();
            tokio::spawn(async move {
                while stream.recv().await.is_some() {
                    if sender.send(name).is_err() {
                        return;
                    }
                }
            });
        }
        Ok(Signals { receiver })
    }
}

async fn run_with_token(
    client: &Client,
    arguments: &ExecArguments,
    issued: &IssuedToken,
    mut signals: Signals,
) -> anyhow::Result<i32> {
    let token_file = TokenFile::create(issued)?;
    let mut command = tokio::process::Command::new(&arguments.command[0]);
    // The command acts for the grant, not for the principal: it never sees the principal's
    // credential, so it cannot request, renew or revoke anything itself.
    for name in valet_client::PRINCIPAL_CREDENTIAL_ENV {
        command.env_remove(name);
    }
    command
        .args(&arguments.command[1..])
        .env(&arguments.env_name, issued.token_str())
        .env("VALET_GRANT", &issued.grant.id)
        .env("VALET_TOKEN_FILE", token_file.path());
    if let Some(aws) = &issued.aws {
        command.envs(aws.environment());
    }
    // As a shell does: 127 when the command is not found, 126 when it cannot be run.
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(error) => {
            eprintln!("valet: cannot run {:?}: {error}", arguments.command[0]);
            return Ok(match error.kind() {
                std::io::ErrorKind::NotFound => 127,
                _ => 126,
            });
        }
    };
    let pid = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .map(Pid::from_raw);

    // On a terminal, Ctrl-C and Ctrl-\ already reach the command (same process group):
    // forwarding them too would deliver each twice.
    let interactive = std::io::stdin().is_terminal();
    let forward = |forwarded: Signal| {
        if let Some(pid) = pid {
            let _ = kill(pid, forwarded);
        }
    };

    // STS credentials live in the command's environment, which cannot change once it runs: an
    // AWS grant is not renewed (ask for a --ttl that covers the command).
    let mut renewal = match &issued.aws {
        Some(_) => Renewal {
            at: None,
            ttl: None,
        },
        None => Renewal::after(&issued.grant, arguments.ttl),
    };
    let status: ExitStatus = loop {
        tokio::select! {
            status = child.wait() => break status?,
            Some(received) = signals.receiver.recv() => {
                let from_terminal = matches!(received, Signal::SIGINT | Signal::SIGQUIT) && interactive;
                if !from_terminal {
                    forward(received);
                }
            }
            _ = renewal.due() => renewal.renew(client, &issued.grant.id, &token_file).await,
        }
    };
    Ok(exit_code(status))
}

fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|signal| 128 + signal))
        .unwrap_or(EXIT_FAILURE)
}

fn is_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(first) if first.is_ascii_alphabetic() || first == b'_')
        && bytes.all(|byte| byte.is_ascii_alphanumeric() || byte == b'_')
}

/// When to renew next: at two thirds of the remaining lifetime, like a DHCP lease, but no sooner
/// than one second from now (valetd's expiries have one-second resolution).
struct Renewal {
    at: Option<Instant>,
    ttl: Option<Duration>,
}

impl Renewal {
    fn after(grant: &valet_client::v1::Grant, ttl: Option<Duration>) -> Renewal {
        Renewal {
            at: next_renewal(grant),
            ttl,
        }
    }

    async fn due(&self) {
        match self.at {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    }

    async fn renew(&mut self, client: &Client, grant_id: &str, token_file: &TokenFile) {
        match client.renew(grant_id, self.ttl).await {
            Ok(renewed) => match token_file.replace(&renewed) {
                Ok(()) => self.at = next_renewal(&renewed.grant),
                Err(error) => {
                    eprintln!(
                        "valet: renewed grant {grant_id} but cannot write the token file: {error}"
                    );
                    self.at = None;
                }
            },
            Err(error)
                if matches!(
                    error.code(),
                    Some(tonic::Code::Unavailable | tonic::Code::Aborted)
                ) || matches!(
                    error,
                    ClientError::Unreachable { .. } | ClientError::Transport { .. }
                ) =>
            {
                eprintln!("valet: renewing grant {grant_id} failed ({error}); retrying in 5s");
                self.at = Some(Instant::now() + Duration::from_secs(5));
            }
            Err(error) => {
                eprintln!("valet: grant {grant_id} will not be renewed: {error}");
                self.at = None;
            }
        }
    }
}

fn next_renewal(grant: &valet_client::v1::Grant) -> Option<Instant> {
    let expires_at = grant.expires_at.as_ref()?.seconds;
    let max_expires_at = grant
        .max_expires_at
        .as_ref()
        .map(|at| at.seconds)
        .unwrap_or(expires_at);
    if expires_at >= max_expires_at {
        return None;
    }
    let remaining_millis = u64::try_from(expires_at)
        .unwrap_or(0)
        .saturating_mul(1000)
        .saturating_sub(SystemClock.now_millis());
    Some(Instant::now() + Duration::from_millis((remaining_millis * 2 / 3).max(1000)))
}

/// The token file: a private directory with one file, removed when dropped.
struct TokenFile {
    directory: PathBuf,
}

impl TokenFile {
    fn create(issued: &IssuedToken) -> anyhow::Result<TokenFile> {
        let random: [u8; 8] = valet_core::random::bytes()?;
        let directory = std::env::temp_dir().join(format!("valet-exec-{}", hex::encode(random)));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&directory)
            .with_context(|| format!("cannot create {}", directory.display()))?;
        let file = TokenFile { directory };
        file.replace(issued)?;
        Ok(file)
    }

    fn path(&self) -> PathBuf {
        self.directory.join("token")
    }

    /// Writes the token to a new file and renames it over the old one, so readers never see half.
    fn replace(&self, issued: &IssuedToken) -> std::io::Result<()> {
        let staging = self.directory.join("token.new");
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&staging)?;
        file.write_all(issued.token_str().as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&staging, self.path())
    }
}

impl Drop for TokenFile {
    fn drop(&mut self) {
        let _ = remove_directory(&self.directory);
    }
}

fn remove_directory(directory: &Path) -> std::io::Result<()> {
    std::fs::remove_dir_all(directory)
}

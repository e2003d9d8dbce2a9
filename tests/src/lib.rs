//! Harness for end-to-end tests: writes a config into a temp dir, starts a real `valetd` on a free
//! loopback port, connects clients as its principals, and stops the process when dropped — also
//! when the test fails. Everything valetd prints is kept, so tests can scan it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use valet_client::{Client, ClientConfig};

pub mod attacker;
pub mod etcd;
pub mod frameworks;
pub mod moto;
pub mod nginx;
pub mod oidc;
pub mod pki;
pub mod ports;
pub mod upstream;
use valet_core::Secret;

/// Keys of the principals every test config defines.
pub const AGENT_KEY: &str = "vk_test_agent_3b1f0c6e5d4a";
pub const OTHER_AGENT_KEY: &str = "vk_test_other_agent_91ab77";
pub const OPERATOR_KEY: &str = "vk_test_operator_c0ffee42";
pub const ADMIN_KEY: &str = "vk_test_admin_5eed1e55";

/// Root credentials of the test config: nothing valetd emits may contain them.
pub const RAILWAY_ROOT_SECRET: &str = "railway-ROOT-secret-7a61c0b2d9e84f35";
pub const GITHUB_ROOT_SECRET: &str = "ghp_ROOTsecretTokenNeverLeaves0451";
/// The key-encryption key of the test config (base64 of 32 bytes).
pub const SEAL_KEY: &str = "q83vEjRWeJq83vEjRWeJq83vEjRWeJq83vEjRWeJq80=";

/// The path of a workspace binary, next to the test executable's `deps` directory.
pub fn binary(name: &str) -> PathBuf {
    let executable = std::env::current_exe().expect("the test executable has a path");
    let directory = executable
        .parent()
        .and_then(Path::parent)
        .expect("tests run from target/<profile>/deps");
    let path = directory.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`; the README's test command does)",
        path.display()
    );
    path
}

/// The SHA-256 of `text` in hex, as configs name principal keys (and servers log tokens).
pub fn sha256_hex(text: &str) -> String {
    let digest = Secret::from(text.to_string()).sha256();
    digest.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// The standard test config, with `extra` appended (more scopes, say). Paths are relative to the
/// config's directory.
pub fn standard_config(extra: &str) -> String {
    let template = include_str!("../standard.toml")
        .replace("@AGENT_KEY_SHA256@", &sha256_hex(AGENT_KEY))
        .replace("@OTHER_AGENT_KEY_SHA256@", &sha256_hex(OTHER_AGENT_KEY))
        .replace("@OPERATOR_KEY_SHA256@", &sha256_hex(OPERATOR_KEY))
        .replace("@ADMIN_KEY_SHA256@", &sha256_hex(ADMIN_KEY));
    format!("{template}{extra}\n")
}

/// A directory holding a config and everything it points at.
pub struct Deployment {
    pub directory: tempfile::TempDir,
}

impl Deployment {
    /// A deployment of `config` (see [`standard_config`]) with its seal key and credential files.
    pub fn new(config: &str) -> Deployment {
        let directory = tempfile::tempdir().expect("a temp dir");
        std::fs::write(directory.path().join("valet.toml"), config).expect("write config");
        std::fs::write(directory.path().join("seal.key"), SEAL_KEY).expect("write seal key");
        std::fs::write(
            directory.path().join("railway.secret"),
            format!("{RAILWAY_ROOT_SECRET}\n"),
        )
        .expect("write secret");
        Deployment { directory }
    }

    pub fn standard() -> Deployment {
        Deployment::new(&standard_config(""))
    }

    pub fn path(&self, relative: &str) -> PathBuf {
        self.directory.path().join(relative)
    }

    pub fn config_path(&self) -> PathBuf {
        self.path("valet.toml")
    }

    pub fn audit_path(&self) -> PathBuf {
        self.path("audit/audit.jsonl")
    }

    /// Every record of the current audit file, parsed.
    pub fn audit_records(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.audit_path())
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str(line).expect("an audit record is JSON"))
            .collect()
    }

    /// How many calls were refused, by the records valetd wrote: each refusal recorded whole,
    /// and those a summary counted (`n_more`). Read after valetd stopped, when every open
    /// window's summary has been written.
    pub fn refused_calls(&self) -> u64 {
        self.audit_records()
            .iter()
            .filter(|record| record["action"] == "gateway.call" && record["outcome"] == "denied")
            .map(|record| match record["n_more"].as_str() {
                Some(more) => more.parse().unwrap_or(0),
                None => 1,
            })
            .sum()
    }

    /// Starts valetd on this deployment with extra arguments.
    pub fn start(&self, extra_arguments: &[&str]) -> Valetd {
        Valetd::start(&self.config_path(), extra_arguments, &[])
    }

    /// Starts valetd with extra environment variables (credentials read from the environment).
    pub fn start_with_env(&self, environment: &[(&str, &str)]) -> Valetd {
        Valetd::start(&self.config_path(), &[], environment)
    }

    /// Starts valetd with its open-file limits (soft, hard) set by `prlimit` (util-linux),
    /// which then runs valetd in its own place (same process id).
    pub fn start_with_file_limits(&self, soft: u64, hard: u64) -> Valetd {
        let mut command = Command::new("prlimit");
        command.arg(format!("--nofile={soft}:{hard}"));
        Valetd::spawn(command, &self.config_path(), &[], &[])
    }

    /// Runs valetd expecting it to fail at start; returns (exit code, everything it printed).
    pub fn start_expecting_failure(&self, extra_arguments: &[&str]) -> (i32, String) {
        let output = valetd_command(&self.config_path(), extra_arguments)
            .output()
            .expect("run valetd");
        assert!(
            !output.status.success(),
            "valetd was expected to fail but exited successfully"
        );
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        (output.status.code().unwrap_or(-1), text)
    }
}

fn valetd_command(config: &Path, extra_arguments: &[&str]) -> Command {
    valetd_command_in(Command::new(binary("valetd")), config, extra_arguments)
}

/// `command` (valetd, or a program that runs it with its arguments) with valetd's arguments.
fn valetd_command_in(mut command: Command, config: &Path, extra_arguments: &[&str]) -> Command {
    if command.get_program() != binary("valetd").as_os_str() {
        command.arg(binary("valetd"));
    }
    command
        .arg("--config")
        .arg(config)
        .args(extra_arguments)
        .env("VALET_TEST_GITHUB_TOKEN", GITHUB_ROOT_SECRET)
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// A running valetd; stopped (SIGKILL if needed) when dropped.
pub struct Valetd {
    child: Option<Child>,
    pub address: String,
    /// The gateway's address, when the config has one.
    pub gateway: Option<String>,
    /// The metrics listener's address (`IP:PORT`), when the config has one.
    pub metrics: Option<String>,
    /// The console listener's address (`IP:PORT`), when the config has one.
    pub console: Option<String>,
    output: Arc<Mutex<String>>,
    /// One message per output stream whose reader has read it to its end.
    ended: Mutex<std::sync::mpsc::Receiver<()>>,
}

/// Sent when dropped: a reader thread's last act, however it ends.
struct EndSignal(std::sync::mpsc::Sender<()>);

impl Drop for EndSignal {
    fn drop(&mut self) {
        let _ = self.0.send(());
    }
}

impl Valetd {
    fn start(config: &Path, extra_arguments: &[&str], environment: &[(&str, &str)]) -> Valetd {
        Valetd::spawn(
            Command::new(binary("valetd")),
            config,
            extra_arguments,
            environment,
        )
    }

    fn spawn(
        program: Command,
        config: &Path,
        extra_arguments: &[&str],
        environment: &[(&str, &str)],
    ) -> Valetd {
        let mut child = valetd_command_in(program, config, extra_arguments)
            .envs(environment.iter().copied())
            .spawn()
            .expect("start valetd");
        let output = Arc::new(Mutex::new(String::new()));
        let (address_sender, address_receiver) = std::sync::mpsc::channel();
        // Each reader says when its stream ended, so the whole output can be awaited.
        let (ended_sender, ended) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().expect("piped stderr");
        let stdout = child.stdout.take().expect("piped stdout");
        for (stream, is_stderr) in [
            (Box::new(stderr) as Box<dyn std::io::Read + Send>, true),
            (Box::new(stdout), false),
        ] {
            let output = output.clone();
            let address_sender = address_sender.clone();
            let ended_sender = ended_sender.clone();
            std::thread::spawn(move || {
                let _ended = EndSignal(ended_sender);
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    // Each listener announces its address: `<what> listening on IP:PORT …`.
                    for (announcement, tag) in [
                        ("gateway listening on ", "gateway "),
                        ("metrics listening on ", "metrics "),
                        ("console listening on ", "console "),
                        ("valetd listening on ", ""),
                    ] {
                        if is_stderr && let Some(address) = line.split(announcement).nth(1) {
                            let address = address
                                .split(|character: char| {
                                    character.is_whitespace() || character == '"'
                                })
                                .next()
                                .unwrap_or_default();
                            let _ = address_sender.send(format!("{tag}{address}"));
                        }
                    }
                    let mut text = output
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner());
                    text.push_str(&line);
                    text.push('\n');
                }
            });
        }
        let mut valetd = Valetd {
            ended: Mutex::new(ended),
            child: Some(child),
            address: String::new(),
            gateway: None,
            metrics: None,
            console: None,
            output,
        };
        // The gateway, metrics and console listeners (when configured) announce themselves before the
        // gRPC listener.
        loop {
            match address_receiver.recv_timeout(Duration::from_secs(30)) {
                Ok(address) if address.starts_with("gateway ") => {
                    valetd.gateway = Some(format!("http://{}", &address["gateway ".len()..]))
                }
                Ok(address) if address.starts_with("metrics ") => {
                    valetd.metrics = Some(address["metrics ".len()..].to_string())
                }
                Ok(address) if address.starts_with("console ") => {
                    valetd.console = Some(address["console ".len()..].to_string())
                }
                Ok(address) => {
                    valetd.address = format!("http://{address}");
                    return valetd;
                }
                Err(_) => panic!(
                    "valetd did not start listening within 30 s; it printed:\n{}",
                    valetd.output()
                ),
            }
        }
    }

    /// valetd's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Everything valetd printed so far (stdout and stderr).
    pub fn output(&self) -> String {
        self.output
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// A client authenticated with `key`.
    pub async fn client(&self, key: &str) -> Client {
        Client::connect(ClientConfig::new(
            self.address.clone(),
            Secret::from(key.to_string()),
        ))
        .await
        .expect("connect to valetd")
    }

    /// The approval requests waiting for people now, as an operator lists them.
    pub async fn pending_approvals(&self) -> Vec<valet_client::v1::Approval> {
        self.client(OPERATOR_KEY)
            .await
            .admin()
            .list_approvals(valet_client::v1::ListApprovalsRequest {
                pending_only: true,
                ..Default::default()
            })
            .await
            .expect("list the pending approvals")
            .into_inner()
            .approvals
    }

    /// Sends a signal to valetd (`kill -SIGNAL`).
    pub fn signal(&self, signal: &str) {
        if let Some(child) = &self.child {
            let status = Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(child.id().to_string())
                .status()
                .expect("run kill");
            assert!(status.success(), "kill -{signal} failed");
        }
    }

    /// Stops valetd with SIGTERM and returns its exit code. Async, so the test's own client
    /// connections keep being driven while valetd closes them.
    /// Stops valetd (SIGTERM) and returns everything it printed, to the end.
    pub async fn stop_with_output(self) -> String {
        let output = self.output.clone();
        let ended = std::mem::replace(
            &mut *self
                .ended
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
            std::sync::mpsc::channel().1,
        );
        self.stop().await;
        // Both readers (stdout, stderr) finish once the pipes close: wait for them, so nothing
        // valetd printed is missed.
        tokio::task::spawn_blocking(move || {
            for _ in 0..2 {
                assert!(
                    ended.recv_timeout(Duration::from_secs(30)).is_ok(),
                    "valetd's output did not end within 30 s of its exit"
                );
            }
        })
        .await
        .expect("wait for the output readers");
        output
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    pub async fn stop(mut self) -> Option<i32> {
        self.signal("TERM");
        let mut child = self.child.take()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("valetd did not stop within 20 s of SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Valetd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Polls `check` until it returns true or `limit` passes; returns whether it did.
pub async fn eventually<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Issues `request` through `client` until `stop` is set; returns what it got, each with the
/// moment it arrived, and the failures with theirs (pausing 50 ms after each failure).
pub async fn issue_until(
    client: Client,
    request: valet_client::TokenRequest,
    stop: Arc<std::sync::atomic::AtomicBool>,
    started: Instant,
) -> (
    Vec<(Duration, valet_client::IssuedToken)>,
    Vec<(Duration, tonic::Code, String)>,
) {
    let mut issued = Vec::new();
    let mut failed = Vec::new();
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        match client.request_token(request.clone()).await {
            Ok(token) => issued.push((started.elapsed(), token)),
            Err(error) => {
                failed.push((
                    started.elapsed(),
                    error.code().unwrap_or(tonic::Code::Unknown),
                    error.to_string(),
                ));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    (issued, failed)
}

/// Whether `token` introspects as active through `client`.
pub async fn is_active(client: &Client, token: &str) -> bool {
    client
        .introspect(token)
        .await
        .is_ok_and(|reply| reply.active)
}

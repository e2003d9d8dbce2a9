//! Real upstream frameworks for the gateway's security tests, in four language families, each
//! decoding requests its own way: express-graphql and Express (body-parser, qs, method-override)
//! on Node; Strawberry, FastAPI with pydantic and an MCP server (the MCP Python SDK) on Python; a
//! Go server on the standard library's net/http and encoding/json; a PHP script under PHP's
//! built-in server (json_decode, $_POST). Each runs as its own process on a loopback port and
//! appends what it executed to a log; the tests assert from that log, never from how Valet parsed
//! the request. The test command installs them (tests/upstreams, var/venv, Debian's golang-go
//! and php-cli); a test that finds one missing fails and says how to install it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A framework process; stopped when dropped.
pub struct Framework {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    log: PathBuf,
    _directory: tempfile::TempDir,
}

/// The repository's root directory.
pub fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the repository")
        .to_path_buf()
}

/// The test venv's Python (strawberry-graphql, uvicorn, the MCP SDK); a missing venv fails the
/// test with how to create it.
pub fn venv_python() -> PathBuf {
    let python = repository().join("var/venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run ./scripts/test.sh, which creates the venv and installs strawberry-graphql, uvicorn and mcp",
        python.display()
    );
    python
}

impl Framework {
    /// express-graphql 0.12 on graphql-js 15, at `/graphql`.
    pub fn express_graphql() -> Framework {
        Framework::node("graphql_express.js")
    }

    /// Express 4 with method-override (headers and `_method`) and compression.
    pub fn express_rest() -> Framework {
        Framework::node("rest_express.js")
    }

    /// Strawberry (ASGI) under uvicorn, at `/graphql`.
    pub fn strawberry() -> Framework {
        let python = venv_python();
        Framework::start(
            Command::new(python).arg(repository().join("tests/upstreams/graphql_strawberry.py")),
        )
    }

    /// A deployment platform's MCP server (the MCP Python SDK) over Streamable HTTP at `/mcp`,
    /// holding `token` as its account token and requiring it as the bearer of every request.
    pub fn mcp_deploy(token: &str) -> Framework {
        let python = venv_python();
        Framework::start(
            Command::new(python)
                .arg(repository().join("tests/upstreams/mcp_deploy.py"))
                .env("DEPLOY_TOKEN", token),
        )
    }

    /// FastAPI with pydantic models under uvicorn: `/volumes/delete`, `/deployments/scale`.
    pub fn fastapi() -> Framework {
        let python = venv_python();
        Framework::start(
            Command::new(python).arg(repository().join("tests/upstreams/rest_fastapi.py")),
        )
    }

    /// A Go server on net/http and encoding/json: `/volumes/delete` (JSON or form),
    /// `/deployments/scale`, and JSON-RPC at `/mcp` with tool arguments decoded into structs.
    /// Built once per test process into target/, with Debian's golang-go.
    pub fn go() -> Framework {
        Framework::start(&mut Command::new(go_upstream()))
    }

    /// A PHP script under PHP's built-in server: `/volumes/delete` (json_decode or $_POST),
    /// `/deployments/scale`. The built-in server cannot say which port it took, so it gets one
    /// from [`crate::ports`] and is ready once it accepts a connection.
    pub fn php() -> Framework {
        assert!(
            Path::new("/usr/bin/php").exists(),
            "/usr/bin/php is missing: run ./scripts/test.sh, which installs Debian's php-cli"
        );
        let directory = tempfile::tempdir().expect("temp dir");
        let log = directory.path().join("executed.jsonl");
        std::fs::write(&log, b"").expect("create the execution log");
        let port = crate::ports::reserve();
        let child = Command::new("/usr/bin/php")
            .arg("-S")
            .arg(format!("127.0.0.1:{port}"))
            .arg(repository().join("tests/upstreams/php_upstream.php"))
            .env("UPSTREAM_LOG", &log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start php -S");
        let started = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "php -S did not listen on port {port} within 30 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Framework {
            child,
            url: format!("http://127.0.0.1:{port}"),
            log,
            _directory: directory,
        }
    }

    /// An upstream that reflects its request into every channel of its answer (status line,
    /// a header, agent-chosen body chunks, an HTTP/2 trailer): over HTTP/1.1, or with `tls`
    /// (certificate and key files) HTTP/2 over TLS.
    pub fn reflect(tls: Option<(&Path, &Path)>) -> Framework {
        let mut command = Command::new("node");
        command.arg(repository().join("tests/upstreams/reflect.js"));
        let after: Vec<&std::ffi::OsStr> = tls
            .map(|(certificate, key)| vec![certificate.as_os_str(), key.as_os_str()])
            .unwrap_or_default();
        Framework::start_with(&mut command, &after)
    }

    fn node(script: &str) -> Framework {
        let modules = repository().join("tests/upstreams/node_modules");
        assert!(
            modules.exists(),
            "{} is missing: run ./scripts/test.sh, which installs the Node upstreams with npm ci",
            modules.display()
        );
        let mut command = Command::new("node");
        command.arg(repository().join("tests/upstreams").join(script));
        Framework::start(&mut command)
    }

    fn start(command: &mut Command) -> Framework {
        Framework::start_with(command, &[])
    }

    /// Starts `command PORT LOG [after…]` with port 0 and a fresh log, and waits for the line
    /// saying where it listens.
    fn start_with(command: &mut Command, after: &[&std::ffi::OsStr]) -> Framework {
        let directory = tempfile::tempdir().expect("temp dir");
        let log = directory.path().join("executed.jsonl");
        std::fs::write(&log, b"").expect("create the execution log");
        let mut child = command
            .arg("0")
            .arg(&log)
            .args(after)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the upstream framework (node and python3 are needed)");
        let stdout = child.stdout.take().expect("stdout is piped");
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(port) = line.strip_prefix("listening on ") {
                    let _ = sender.send(port.trim().to_string());
                }
            }
        });
        let port = match receiver.recv_timeout(Duration::from_secs(30)) {
            Ok(port) => port,
            Err(_) => {
                let _ = child.kill();
                panic!("the upstream framework did not say where it listens within 30 s");
            }
        };
        Framework {
            child,
            url: format!("http://127.0.0.1:{port}"),
            log,
            _directory: directory,
        }
    }

    /// Everything the framework executed, one JSON object per handled request or resolved field.
    pub fn executed(&self) -> Vec<serde_json::Value> {
        executed_log(&self.log)
    }
}

impl Drop for Framework {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Go upstream's binary, built the first time a test asks for it (the build takes a second;
/// Go caches it).
fn go_upstream() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            assert!(
                Path::new("/usr/bin/go").exists(),
                "/usr/bin/go is missing: run ./scripts/test.sh, which installs Debian's golang-go"
            );
            // Built under a name of this process, then renamed into place: a test process never
            // runs a binary another is still writing.
            let directory = repository().join("target/upstreams");
            let output = directory.join("go_upstream");
            let building = directory.join(format!("go_upstream.{}", std::process::id()));
            let built = Command::new("/usr/bin/go")
                .arg("build")
                .arg("-o")
                .arg(&building)
                .arg(repository().join("tests/upstreams/go_upstream.go"))
                .env("GOFLAGS", "-mod=mod")
                .env("GO111MODULE", "off")
                .output()
                .expect("run go build");
            assert!(
                built.status.success(),
                "go build of tests/upstreams/go_upstream.go failed:\n{}",
                String::from_utf8_lossy(&built.stderr)
            );
            std::fs::rename(&building, &output).expect("move the Go upstream into place");
            output
        })
        .clone()
}

/// The JSON lines of an execution log (a framework's, or a stdio MCP server's valetd runs).
pub fn executed_log(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).expect("the framework logs JSON lines"))
        .collect()
}

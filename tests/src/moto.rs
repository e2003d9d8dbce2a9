//! A local AWS peer for the aws-sts tests: a real `moto_server` process on loopback with
//! authentication on, set up (user, access key, role, trust policy, bucket) by
//! `tests/aws/moto_setup.py`, and read back through moto's own state dump.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How many calls `moto_setup.py` makes before authentication must be on.
const SETUP_CALLS: u32 = 7;

/// The Python virtual environment the README's test command installs moto and boto3 into.
pub fn venv() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../var/venv")
}

/// The venv's Python, which has boto3. Fails loudly when the venv is missing.
pub fn python() -> PathBuf {
    let path = venv().join("bin/python");
    assert!(
        path.exists(),
        "{} is missing: the AWS tests need moto and boto3; run ./scripts/test.sh, which installs them into var/venv",
        path.display()
    );
    path
}

/// A running moto server; killed when dropped.
pub struct Moto {
    child: Child,
    pub endpoint: String,
    /// The broker user's access key, which valetd signs with.
    pub access_key_id: String,
    pub secret_access_key: String,
    pub role_arn: String,
    pub bucket: String,
}

impl Moto {
    pub fn start() -> Moto {
        let server = venv().join("bin/moto_server");
        assert!(
            server.exists(),
            "{} is missing: the AWS tests need moto; run ./scripts/test.sh, which installs it into var/venv",
            server.display()
        );
        let port = crate::ports::reserve();
        let child = Command::new(server)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .env("INITIAL_NO_AUTH_ACTION_COUNT", SETUP_CALLS.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server");
        let endpoint = format!("http://127.0.0.1:{port}");
        let mut moto = Moto {
            child,
            endpoint,
            access_key_id: String::new(),
            secret_access_key: String::new(),
            role_arn: String::new(),
            bucket: String::new(),
        };
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "moto_server did not listen on port {port} within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let output = Command::new(python())
            .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("aws/moto_setup.py"))
            .arg(&moto.endpoint)
            .output()
            .expect("run moto_setup.py");
        assert!(
            output.status.success(),
            "moto_setup.py failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let setup: serde_json::Value =
            serde_json::from_slice(&output.stdout).expect("moto_setup.py prints JSON");
        let field = |name: &str| setup[name].as_str().expect(name).to_string();
        moto.access_key_id = field("access_key_id");
        moto.secret_access_key = field("secret_access_key");
        moto.role_arn = field("role_arn");
        moto.bucket = field("bucket");
        moto
    }

    /// moto's whole state, as its `/moto-api/data.json` dumps it.
    pub fn state(&self) -> serde_json::Value {
        let output = Command::new(python())
            .args([
                "-c",
                "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1]).read().decode())",
            ])
            .arg(format!("{}/moto-api/data.json", self.endpoint))
            .output()
            .expect("read moto's state");
        serde_json::from_slice(&output.stdout).expect("moto's state is JSON")
    }

    /// Every role session moto handed out: (session name, the session policy it received).
    pub fn sessions(&self) -> Vec<(String, String)> {
        self.state()["sts"]["AssumedRole"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|session| {
                (
                    session["session_name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    session["policy"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    }

    /// The inline policy `name` of the test role, as moto holds it.
    pub fn role_policy(&self, name: &str) -> Option<String> {
        self.state()["iam"]["Role"]
            .as_array()?
            .iter()
            .find(|role| role["arn"] == self.role_arn.as_str())?["policies"][name]
            .as_str()
            .map(str::to_string)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

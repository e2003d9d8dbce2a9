//! nginx from Debian's packages as a TLS-terminating reverse proxy in front of a plaintext
//! listener, as operators put one in front of the console; stopped when dropped.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running nginx proxying `https://127.0.0.1:{port}` to one plaintext upstream.
pub struct TlsProxy {
    child: Child,
    /// `127.0.0.1:port`, where nginx serves TLS.
    pub address: String,
    _directory: tempfile::TempDir,
}

/// Where Debian installs nginx, if it is installed.
pub fn binary() -> Option<PathBuf> {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .map(PathBuf::from)
        .find(|path| path.exists())
}

/// An nginx config that runs in the foreground with its pid and temp files under `directory`,
/// logs errors to stderr and no access, and serves `http` (the `http` block's own directives).
pub fn config(directory: &Path, worker_connections: u32, http: &str) -> String {
    let dir = directory.display();
    format!(
        r#"
daemon off;
worker_processes 1;
error_log stderr warn;
pid {dir}/nginx.pid;
events {{ worker_connections {worker_connections}; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
{http}
}}
"#
    )
}

impl TlsProxy {
    /// Serves TLS on `port` (from [`crate::ports::reserve`]) and proxies to `upstream`
    /// (`127.0.0.1:port`) with the server certificate and key given, passing
    /// `X-Forwarded-Proto: https` as such proxies do.
    pub fn start(port: u16, upstream: &str, certificate: &Path, key: &Path) -> TlsProxy {
        let directory = tempfile::tempdir().expect("temp dir");
        let config = config(
            directory.path(),
            64,
            &format!(
                r#"  server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {certificate};
    ssl_certificate_key {key};
    location / {{
      proxy_pass http://{upstream};
      proxy_http_version 1.1;
      proxy_set_header Host $host:$server_port;
      proxy_set_header X-Forwarded-Proto https;
      proxy_buffering off;
    }}
  }}"#,
                certificate = certificate.display(),
                key = key.display(),
            ),
        );
        let path = directory.path().join("nginx.conf");
        std::fs::write(&path, config).expect("write nginx.conf");
        let nginx = binary().expect(
            "nginx is missing: run ./scripts/test.sh, which installs it from Debian's packages",
        );
        let child = Command::new(nginx)
            .arg("-c")
            .arg(&path)
            .arg("-p")
            .arg(directory.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            // Its own process group, so the master and its worker stop together.
            .process_group(0)
            .spawn()
            .expect("start nginx");
        let address = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&address).is_err() {
            assert!(
                Instant::now() < deadline,
                "nginx did not listen on {address} within 20 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        TlsProxy {
            child,
            address,
            _directory: directory,
        }
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.wait();
    }
}

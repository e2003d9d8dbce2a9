//! Real etcd clusters for the distributed-mode tests: one to three `etcd` processes on loopback,
//! each with its own data dir and ports, that tests can kill and bring back.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The etcd binary (Debian's etcd-server, which the README's test command installs).
fn etcd_binary() -> PathBuf {
    let path = PathBuf::from("/usr/bin/etcd");
    assert!(
        path.exists(),
        "{} is missing: the distributed-mode tests need etcd; run ./scripts/test.sh, which installs Debian's etcd-server",
        path.display()
    );
    path
}

/// Certificates for a cluster that speaks TLS to its clients and asks them for a certificate.
pub struct TlsFiles {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl TlsFiles {
    /// A throwaway CA, a server certificate for 127.0.0.1 and a client certificate, made with
    /// the openssl command line into `directory`.
    fn generate(directory: &std::path::Path) -> TlsFiles {
        let run = |arguments: &[&str]| {
            let output = Command::new("openssl")
                .current_dir(directory)
                .args(arguments)
                .output()
                .expect("run openssl");
            assert!(
                output.status.success(),
                "openssl {arguments:?} failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        };
        let key = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        run(&[
            &["req", "-x509"][..],
            &key[..],
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=valet-test-ca",
            ][..],
        ]
        .concat());
        std::fs::write(
            directory.join("server.ext"),
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n",
        )
        .expect("write extensions");
        std::fs::write(
            directory.join("client.ext"),
            "extendedKeyUsage=clientAuth\n",
        )
        .expect("write extensions");
        for name in ["server", "client"] {
            run(&[
                &["req"][..],
                &key[..],
                &[
                    "-keyout",
                    &format!("{name}.key"),
                    "-out",
                    &format!("{name}.csr"),
                    "-subj",
                    &format!("/CN=valet-test-{name}"),
                ][..],
            ]
            .concat());
            run(&[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{name}.pem"),
                "-days",
                "2",
                "-extfile",
                &format!("{name}.ext"),
            ]);
        }
        TlsFiles {
            ca: directory.join("ca.pem"),
            server_cert: directory.join("server.pem"),
            server_key: directory.join("server.key"),
            client_cert: directory.join("client.pem"),
            client_key: directory.join("client.key"),
        }
    }
}

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

/// A running cluster; every member is killed when it is dropped.
pub struct EtcdCluster {
    members: Vec<Member>,
    directory: tempfile::TempDir,
    initial_cluster: String,
    /// Set when clients must speak TLS and present a certificate.
    pub tls: Option<TlsFiles>,
}

impl EtcdCluster {
    /// Starts `size` members and waits until the cluster answers.
    pub fn start(size: usize) -> EtcdCluster {
        EtcdCluster::start_with(size, false)
    }

    /// Starts `size` members that speak TLS to clients and require a client certificate.
    pub fn start_tls(size: usize) -> EtcdCluster {
        EtcdCluster::start_with(size, true)
    }

    fn start_with(size: usize, tls: bool) -> EtcdCluster {
        let members: Vec<Member> = (0..size)
            .map(|index| Member {
                name: format!("m{index}"),
                client_port: crate::ports::reserve(),
                peer_port: crate::ports::reserve(),
                child: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|member| format!("{}=http://127.0.0.1:{}", member.name, member.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let directory = tempfile::tempdir().expect("a temp dir");
        let tls = tls.then(|| TlsFiles::generate(directory.path()));
        let mut cluster = EtcdCluster {
            members,
            directory,
            initial_cluster,
            tls,
        };
        for index in 0..size {
            cluster.launch(index);
        }
        cluster.wait_healthy(Duration::from_secs(30));
        cluster
    }

    fn launch(&mut self, index: usize) {
        let member = &self.members[index];
        let scheme = self.scheme();
        let mut command = Command::new(etcd_binary());
        if let Some(tls) = &self.tls {
            command
                .arg("--cert-file")
                .arg(&tls.server_cert)
                .arg("--key-file")
                .arg(&tls.server_key)
                .arg("--trusted-ca-file")
                .arg(&tls.ca)
                .arg("--client-cert-auth");
        }
        let child = command
            .args(["--name", &member.name])
            .arg("--data-dir")
            .arg(self.directory.path().join(&member.name))
            .args([
                "--listen-client-urls",
                &format!("{scheme}://127.0.0.1:{}", member.client_port),
                "--advertise-client-urls",
                &format!("{scheme}://127.0.0.1:{}", member.client_port),
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{}", member.peer_port),
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{}", member.peer_port),
                "--initial-cluster",
                &self.initial_cluster,
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                "valet-test",
                "--heartbeat-interval",
                "50",
                "--election-timeout",
                "500",
                "--logger",
                "zap",
                "--log-level",
                "error",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start etcd");
        self.members[index].child = Some(child);
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    /// The client URLs of every member, running or not.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|member| format!("{}://127.0.0.1:{}", self.scheme(), member.client_port))
            .collect()
    }

    /// etcdctl's arguments for this cluster's endpoints (and certificates).
    fn etcdctl(&self, endpoints: &[String]) -> Command {
        let mut command = Command::new("etcdctl");
        command
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &endpoints.join(",")]);
        if let Some(tls) = &self.tls {
            command
                .arg("--cacert")
                .arg(&tls.ca)
                .arg("--cert")
                .arg(&tls.client_cert)
                .arg("--key")
                .arg(&tls.client_key);
        }
        command
    }

    /// The endpoints as a TOML array.
    pub fn endpoints_toml(&self) -> String {
        let quoted: Vec<String> = self
            .endpoints()
            .iter()
            .map(|endpoint| format!("\"{endpoint}\""))
            .collect();
        format!("[{}]", quoted.join(", "))
    }

    /// Turns on etcd authentication: a root user, and `user` with read-write on `prefix` only.
    pub fn enable_auth(&self, user: &str, password: &str, prefix: &str) {
        let endpoints = self.endpoints();
        let run = |arguments: &[&str]| {
            let output = self
                .etcdctl(&endpoints)
                .args(arguments)
                .output()
                .expect("run etcdctl");
            assert!(
                output.status.success(),
                "etcdctl {arguments:?} failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        };
        run(&["user", "add", "root:root-password-for-tests"]);
        run(&["user", "add", &format!("{user}:{password}")]);
        run(&["role", "add", user]);
        run(&[
            "role",
            "grant-permission",
            user,
            "--prefix=true",
            "readwrite",
            prefix,
        ]);
        run(&["user", "grant-role", user, user]);
        run(&["auth", "enable"]);
    }

    /// `kill -9` one member.
    pub fn kill(&mut self, index: usize) {
        if let Some(mut child) = self.members[index].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Brings a killed member back with its data.
    pub fn restart(&mut self, index: usize) {
        self.launch(index);
    }

    /// Waits until a write through the running members succeeds (a quorum is up).
    pub fn wait_healthy(&self, limit: Duration) {
        let started = Instant::now();
        let running: Vec<String> = self
            .members
            .iter()
            .zip(self.endpoints())
            .filter(|(member, _)| member.child.is_some())
            .map(|(_, endpoint)| endpoint)
            .collect();
        loop {
            let healthy = self
                .etcdctl(&running)
                .args(["--command-timeout=1s", "put", "/health-check", "ok"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|status| status.success());
            if healthy {
                return;
            }
            assert!(
                started.elapsed() < limit,
                "etcd did not accept a write within {} s",
                limit.as_secs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for index in 0..self.members.len() {
            self.kill(index);
        }
    }
}

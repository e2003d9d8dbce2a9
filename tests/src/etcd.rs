//! Real etcd clusters for the distributed-mode tests: one to three `etcd` processes on loopback,
//! each with its own data dir and ports, that tests can kill and bring back.

use std::net::TcpListener;
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

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free loopback port")
        .port()
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
}

impl EtcdCluster {
    /// Starts `size` members and waits until the cluster answers.
    pub fn start(size: usize) -> EtcdCluster {
        let members: Vec<Member> = (0..size)
            .map(|index| Member {
                name: format!("m{index}"),
                client_port: free_port(),
                peer_port: free_port(),
                child: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|member| format!("{}=http://127.0.0.1:{}", member.name, member.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = EtcdCluster {
            members,
            directory: tempfile::tempdir().expect("a temp dir"),
            initial_cluster,
        };
        for index in 0..size {
            cluster.launch(index);
        }
        cluster.wait_healthy(Duration::from_secs(30));
        cluster
    }

    fn launch(&mut self, index: usize) {
        let member = &self.members[index];
        let child = Command::new(etcd_binary())
            .args(["--name", &member.name])
            .arg("--data-dir")
            .arg(self.directory.path().join(&member.name))
            .args([
                "--listen-client-urls",
                &format!("http://127.0.0.1:{}", member.client_port),
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{}", member.client_port),
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

    /// The client URLs of every member, running or not.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|member| format!("http://127.0.0.1:{}", member.client_port))
            .collect()
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
        let endpoints = self.endpoints().join(",");
        let run = |arguments: &[&str]| {
            let output = Command::new("etcdctl")
                .env("ETCDCTL_API", "3")
                .args(["--endpoints", &endpoints])
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
        run(&["role", "grant-permission", user, "--prefix=true", "readwrite", prefix]);
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
            let healthy = Command::new("etcdctl")
                .env("ETCDCTL_API", "3")
                .args(["--endpoints", &running.join(","), "--command-timeout=1s"])
                .args(["put", "/health-check", "ok"])
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

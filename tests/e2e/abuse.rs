//! Abuse limits on valetd's listeners: idle and half-sent connections beyond the connection
//! limit, and a process out of file descriptors, leave valetd answering with a bounded log.

use std::io::Write;
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use valet_client::{Client, ClientConfig, TokenRequest};
use valet_core::Secret;
use valet_tests::{AGENT_KEY, Deployment, eventually, standard_config};

/// Opens `count` connections to `address` and sends each the start of `prefix`, never the rest.
fn hold(address: &str, count: usize, prefix: &[u8]) -> Vec<TcpStream> {
    let address = address.trim_start_matches("http://").parse().unwrap();
    (0..count)
        .filter_map(|_| {
            let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(2)).ok()?;
            let _ = stream.write_all(prefix);
            Some(stream)
        })
        .collect()
}

#[tokio::test]
async fn idle_and_half_sent_connections_and_a_file_descriptor_limit_leave_valetd_answering() {
    let config = standard_config("").replace(
        "grant_retention = \"1h\"",
        "grant_retention = \"1h\"\nmax_connections = 100\nidle_timeout = \"2s\"\ngateway_listen = \"127.0.0.1:0\"",
    );
    let deployment = Deployment::new(&config);
    let valetd = deployment.start(&[]);
    let gateway = valetd.gateway.clone().expect("a gateway");
    let agent = valetd.client(AGENT_KEY).await;
    agent
        .request_token(TokenRequest::new("limited", "before"))
        .await
        .unwrap();
    let audit_before = std::fs::read_to_string(deployment.path("audit/audit.jsonl"))
        .unwrap()
        .lines()
        .count();

    // Fewer file descriptors than the connections about to arrive: accepting must fail for a
    // while, and valetd must back off rather than spin.
    let pid = valetd.pid().unwrap().to_string();
    let limited = Command::new("prlimit")
        .args(["--pid", &pid, "--nofile=160:160"])
        .status()
        .expect("run prlimit (util-linux)");
    assert!(
        limited.success(),
        "prlimit could not lower valetd's file limit"
    );

    let held_grpc = hold(&valetd.address, 150, b"PRI * HTTP/2.0\r\n");
    let held_gateway = hold(&gateway, 150, b"GET /healthz HTTP/1.1\r\nHost: valet\r\n");
    assert!(
        held_grpc.len() + held_gateway.len() >= 250,
        "could not open the connections"
    );

    // While those are still open, a new client is served once idle ones are closed.
    let answered = eventually(Duration::from_secs(60), || async {
        let key = Secret::from(AGENT_KEY.to_string());
        let connect = Client::connect(ClientConfig::new(valetd.address.clone(), key));
        let Ok(Ok(client)) = tokio::time::timeout(Duration::from_secs(5), connect).await else {
            return false;
        };
        let request = client.request_token(TokenRequest::new("limited", "during"));
        matches!(
            tokio::time::timeout(Duration::from_secs(5), request).await,
            Ok(Ok(_))
        )
    })
    .await;
    assert!(
        answered,
        "valetd stopped answering:\n{}",
        tail(&valetd.output())
    );
    drop(held_grpc);
    drop(held_gateway);

    let output = valetd.output();
    let accept_warnings = output.matches("accepting a connection failed").count();
    assert!(
        accept_warnings <= 10,
        "{accept_warnings} accept warnings: the accept loop must back off and log sparingly"
    );
    assert!(
        output.len() < 4_000_000,
        "valetd logged {} bytes",
        output.len()
    );
    // Connections that never authenticated write nothing to the audit log.
    let audit_after = std::fs::read_to_string(deployment.path("audit/audit.jsonl"))
        .unwrap()
        .lines()
        .count();
    assert!(
        audit_after - audit_before <= 4,
        "{} audit records for connections that sent nothing",
        audit_after - audit_before
    );
}

fn tail(text: &str) -> &str {
    &text[text.len().saturating_sub(4000)..]
}

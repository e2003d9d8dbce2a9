//! The root credential is unobservable: the same scripted agent, run against two deployments that
//! differ only in the root secret (its length too), captures the same bytes — status line,
//! headers, body and the chunk boundaries of the body as the gateway wrote them — from upstreams
//! that reflect the credential into every channel they have: an HTTP/1.1 server (reason phrase,
//! a header, agent-chosen chunks), an HTTP/2 server over TLS (a trailer too), and MCP servers (a
//! tool result) run by valetd and reached remotely.

use std::path::Path;

use valet_client::TokenRequest;
use valet_tests::frameworks::{Framework, repository, venv_python};
use valet_tests::{AGENT_KEY, Deployment, Valetd, standard_config};

/// What every complete occurrence becomes.
const MARKER: &str = "[masked by valet]";

fn config(
    reflect: &str,
    reflect_h2: &str,
    ca: &Path,
    mcp_remote: &str,
    stdio_log: &Path,
) -> String {
    let extra = format!(
        r#"
[[upstream]]
name = "reflect"
base_url = "{reflect}"
credential = "railway"
[upstream.inject]
header = {{ Authorization = "Bearer {{secret}}" }}

[[upstream]]
name = "reflect-h2"
base_url = "{reflect_h2}"
ca_file = "{ca}"
credential = "railway"
[upstream.inject]
header = {{ Authorization = "Bearer {{secret}}" }}

[[upstream]]
name = "mcp-remote"
kind = "mcp"
base_url = "{mcp_remote}/mcp"
credential = "railway"
[upstream.inject]
header = {{ Authorization = "Bearer {{secret}}" }}

[[upstream]]
name = "mcp-stdio"
kind = "mcp"
command = "{python}"
args = ["{script}", "--stdio", "{log}"]
credential = "railway"
env = {{ DEPLOY_TOKEN = "{{secret}}" }}

[[scope]]
name = "reflect"
upstream = "reflect"
environment = "staging"
default_ttl = "5m"
max_ttl = "10m"
[[scope.allow]]
method = "POST"
path = "/reflect"
max_body = 1048576

[[scope]]
name = "reflect-h2"
upstream = "reflect-h2"
environment = "staging"
default_ttl = "5m"
max_ttl = "10m"
[[scope.allow]]
method = "POST"
path = "/reflect"
max_body = 1048576
"#,
        ca = ca.display(),
        python = venv_python().display(),
        script = repository().join("tests/upstreams/mcp_deploy.py").display(),
        log = stdio_log.display(),
    );
    let mcp_scope = |name: &str| {
        format!(
            r#"
[[scope]]
name = "{name}"
upstream = "{name}"
environment = "staging"
default_ttl = "5m"
max_ttl = "10m"
[scope.mcp]
[[scope.mcp.tool]]
name = "account_settings"
"#
        )
    };
    standard_config(&format!("{extra}{}{}", mcp_scope("mcp-remote"), mcp_scope("mcp-stdio")))
        .replace(
            "listen = \"127.0.0.1:0\"\n",
            "listen = \"127.0.0.1:0\"\ngateway_listen = \"127.0.0.1:0\"\n",
        )
        .replace(
            "scopes = [\"deploy-staging\", \"limited\", \"short\"]",
            "scopes = [\"deploy-staging\", \"limited\", \"short\", \"reflect\", \"reflect-h2\", \"mcp-remote\", \"mcp-stdio\"]",
        )
}

/// One deployment with its own root secret, and the upstreams reflecting it.
struct Run {
    _upstreams: (Framework, Framework, Framework),
    _deployment: Deployment,
    _directory: tempfile::TempDir,
    valetd: Valetd,
}

impl Run {
    fn start(secret: &str) -> Run {
        let directory = tempfile::tempdir().unwrap();
        let ca = valet_tests::pki::Ca::new("reflect-ca");
        ca.write_certificate(&directory.path().join("ca.crt"));
        let (certificate, key) = ca.server_certificate(
            &["127.0.0.1", "localhost"],
            valet_tests::pki::Validity::Current,
            directory.path(),
            "reflect",
        );
        let reflect = Framework::reflect(None);
        let reflect_h2 = Framework::reflect(Some((&certificate, &key)));
        let mcp_remote = Framework::mcp_deploy(secret);
        let deployment = Deployment::new(&config(
            &reflect.url,
            &reflect_h2.url.replace("http://", "https://"),
            &directory.path().join("ca.crt"),
            &mcp_remote.url,
            &directory.path().join("stdio.jsonl"),
        ));
        std::fs::write(deployment.path("railway.secret"), format!("{secret}\n")).unwrap();
        let valetd = deployment.start(&[]);
        Run {
            _upstreams: (reflect, reflect_h2, mcp_remote),
            _deployment: deployment,
            _directory: directory,
            valetd,
        }
    }

    async fn token(&self, scope: &str) -> String {
        self.valetd
            .client(AGENT_KEY)
            .await
            .request_token(TokenRequest::new(scope, "unobservable"))
            .await
            .unwrap()
            .token_str()
            .to_string()
    }
}

/// What the agent captured of one answer: the status line, the headers (but Date), and the body
/// as the chunks the gateway wrote (HTTP/1.1 chunked encoding, read raw).
#[derive(Debug, PartialEq, Eq)]
struct Captured {
    status_line: String,
    headers: Vec<String>,
    chunks: Vec<Vec<u8>>,
}

impl Captured {
    fn body(&self) -> String {
        String::from_utf8_lossy(&self.chunks.concat()).into_owned()
    }
}

async fn capture(gateway: &str, path: &str, token: &str, body: &str) -> Captured {
    capture_with(gateway, path, token, body, "").await
}

/// [`capture`] with more header lines (each ending in `\r\n`).
async fn capture_with(gateway: &str, path: &str, token: &str, body: &str, extra: &str) -> Captured {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let host = gateway.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
    let request = format!(
        "POST {path} HTTP/1.1\r\nhost: {host}\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n{extra}\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(60),
        stream.read_to_end(&mut raw),
    )
    .await
    .expect("the answer ends")
    .unwrap();
    let split = raw
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .expect("a head");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default().to_string();
    let mut headers: Vec<String> = lines
        .filter(|line| !line.to_ascii_lowercase().starts_with("date:"))
        .map(|line| line.to_ascii_lowercase())
        .collect();
    headers.sort();
    let chunked = headers
        .iter()
        .any(|line| line == "transfer-encoding: chunked");
    let mut rest = &raw[split + 4..];
    let mut chunks = Vec::new();
    if chunked {
        // An answer cut off (the upstream reset) ends where the bytes do.
        while let Some(end) = rest.windows(2).position(|window| window == b"\r\n") {
            let Some(size) = std::str::from_utf8(&rest[..end])
                .ok()
                .and_then(|text| usize::from_str_radix(text.trim(), 16).ok())
            else {
                break;
            };
            rest = &rest[end + 2..];
            if size == 0 || rest.len() < size {
                break;
            }
            chunks.push(rest[..size].to_vec());
            rest = &rest[(size + 2).min(rest.len())..];
        }
    } else {
        chunks.push(rest.to_vec());
    }
    Captured {
        status_line,
        headers,
        chunks,
    }
}

/// A small deterministic generator, so a failing script can be rerun.
struct Scripts(u64);

impl Scripts {
    fn next(&mut self, bound: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % bound
    }

    /// An agent's script: chunks of its own text, guesses at prefixes of `guessed`, the
    /// credential reflected ($AUTH), and sometimes enough padding to pass the masking window.
    fn script(&mut self, guessed: &str) -> serde_json::Value {
        let n_chunks = 1 + self.next(6);
        let mut chunks = Vec::new();
        for _ in 0..n_chunks {
            let mut chunk = String::new();
            for _ in 0..(1 + self.next(3)) {
                match self.next(5) {
                    0 => chunk.push_str(
                        [
                            "$AUTH",
                            "$AUTH_URL",
                            "$AUTH_URL2",
                            "$AUTH_JSON",
                            "$AUTH_GOHTML",
                            "$AUTH_HTML",
                            "$AUTH_B64",
                            "$AUTH_B64URL",
                        ][self.next(8) as usize],
                    ),
                    1 => {
                        chunk.push_str(&guessed[..1 + self.next(guessed.len() as u64 - 1) as usize])
                    }
                    2 => chunk.push_str(&".".repeat(self.next(5000) as usize)),
                    _ => {
                        let length = self.next(40) as usize;
                        chunk.extend((0..length).map(|_| char::from(b'a' + self.next(26) as u8)));
                    }
                }
            }
            chunks.push(chunk);
        }
        serde_json::json!({
            "status_message": "OK $AUTH",
            "header": "$AUTH",
            "trailer": "$AUTH",
            "chunks": chunks,
            "pause_ms": 15,
        })
    }
}

#[tokio::test]
async fn the_same_agent_sees_the_same_bytes_whatever_the_root_secret_is() {
    // Two secrets of different lengths; the agent guesses at prefixes of the first.
    let (first, second) = (
        "rk_live_4f8c2a7e9b1d3f5a6c8e0b2d4f6a8c0e",
        "sk_other_93jd71ka",
    );
    let runs = [Run::start(first), Run::start(second)];
    let mut scripts = Scripts(0x005e_ed0f_7a1e);
    // One write of the echo and 200,000 bytes, which the upstream cuts into frames wherever the
    // raw bytes fall (the chunks once showed the secret's length), then random scripts.
    let big = serde_json::json!({
        "status_message": "OK",
        "chunks": [format!("$AUTH{}", "x".repeat(200_000))],
    });
    for round in 0..11 {
        let script = if round == 0 {
            big.clone()
        } else {
            scripts.script(first)
        };
        let reflects_in_body = script["chunks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|chunk| chunk.as_str().unwrap().contains("$AUTH"));
        let script = script.to_string();
        let mut seen = Vec::new();
        for run in &runs {
            let gateway = run.valetd.gateway.clone().unwrap();
            let mut both = Vec::new();
            for scope in ["reflect", "reflect-h2"] {
                let token = run.token(scope).await;
                let captured =
                    capture(&gateway, &format!("/u/{scope}/reflect"), &token, &script).await;
                assert_eq!(
                    captured.status_line, "HTTP/1.1 200 OK",
                    "{scope}: the gateway's own status line"
                );
                assert!(
                    !captured
                        .headers
                        .iter()
                        .any(|header| header.starts_with("x-reflect")
                            || header.starts_with("x-trailer")),
                    "{scope}: reflected headers and trailers are not passed on: {:?}",
                    captured.headers
                );
                let body = captured.body();
                assert!(
                    !body.contains(first) && !body.contains(second),
                    "{scope}: {body}"
                );
                assert_eq!(
                    body.contains(MARKER),
                    reflects_in_body,
                    "{scope}: marker in {} bytes",
                    body.len()
                );
                both.push(captured);
            }
            seen.push(both);
        }
        if seen[0] != seen[1] {
            let sizes = |run: &Vec<Captured>| -> Vec<Vec<usize>> {
                run.iter()
                    .map(|captured| captured.chunks.iter().map(Vec::len).collect())
                    .collect()
            };
            panic!(
                "round {round} (script {}…): chunk sizes {:?} and {:?}; heads {:?} and {:?}",
                script.chars().take(300).collect::<String>(),
                sizes(&seen[0]),
                sizes(&seen[1]),
                seen[0]
                    .iter()
                    .map(|captured| &captured.headers)
                    .collect::<Vec<_>>(),
                seen[1]
                    .iter()
                    .map(|captured| &captured.headers)
                    .collect::<Vec<_>>(),
            );
        }
    }

    // A prefix oracle through when a block leaves, made deterministic by cutting the answer off:
    // base64 of the credential, a long base64 text of the agent's, then a guess at the
    // credential's first bytes left undecided by a lone percent sign. What had left when the
    // upstream reset must not depend on whether the guess was right (the masker that absorbed
    // the text only once the guess was known not to begin the credential released one more
    // block for a wrong guess: the padding puts the two just either side of a block).
    for scope in ["reflect", "reflect-h2"] {
        let mut sizes = Vec::new();
        for (run, guess) in [
            (0, "rk%5Fl%"),
            (0, "rj%5Fl%"),
            (1, "rk%5Fl%"),
            (1, "sk%5Fo%"),
        ] {
            let script = serde_json::json!({
                "chunks": [format!(
                    "{}$AUTH_B64{}{guess}",
                    ".".repeat(16_384 - 100 - MARKER.len() - guess.len()),
                    "B".repeat(2000)
                )],
                "abort": true,
                "pause_ms": 200,
            })
            .to_string();
            let gateway = runs[run].valetd.gateway.clone().unwrap();
            let token = runs[run].token(scope).await;
            let captured = capture(&gateway, &format!("/u/{scope}/reflect"), &token, &script).await;
            sizes.push(captured.chunks.iter().map(Vec::len).collect::<Vec<_>>());
        }
        assert!(
            sizes.windows(2).all(|pair| pair[0] == pair[1]) && sizes[0] == [4096],
            "{scope}: what left before the reset: {sizes:?}"
        );
    }

    // MCP: a tool whose result carries the account token, on a remote server and on one valetd
    // runs: the same reply whatever the token, with the marker where it was.
    // The stateless revision (2026-07-28): no session, the envelope on the request.
    let call = serde_json::json!({
        "jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": "account_settings", "arguments": {}, "_meta": {
            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "1"},
            "io.modelcontextprotocol/clientCapabilities": {},
        }},
    })
    .to_string();
    let modern =
        "mcp-protocol-version: 2026-07-28\r\naccept: application/json, text/event-stream\r\n";
    for upstream in ["mcp-remote", "mcp-stdio"] {
        let mut seen = Vec::new();
        for run in &runs {
            let gateway = run.valetd.gateway.clone().unwrap();
            let token = run.token(upstream).await;
            let captured =
                capture_with(&gateway, &format!("/mcp/{upstream}"), &token, &call, modern).await;
            let body = captured.body();
            assert!(
                body.contains(&format!("account token: {MARKER}")),
                "{upstream}: {body}"
            );
            seen.push(body);
        }
        assert_eq!(seen[0], seen[1], "{upstream}");
    }
}

/// Authority is checked while an answer streams too: revoking its grant cuts it off.
#[tokio::test]
async fn revoking_a_grant_cuts_off_its_answer_while_it_streams() {
    let run = Run::start("rk_live_revoked_while_streaming_0123456789");
    let agent = run.valetd.client(AGENT_KEY).await;
    let issued = agent
        .request_token(TokenRequest::new("reflect", "long-answer"))
        .await
        .unwrap();
    let gateway = run.valetd.gateway.clone().expect("a gateway");
    // Thirty chunks of 5000 bytes, one every 500 ms: about 15 s if nothing stops it.
    let chunks = vec!["x".repeat(5000); 30];
    let body = serde_json::json!({ "chunks": chunks, "pause_ms": 500 }).to_string();
    let token = issued.token_str().to_string();
    let streaming =
        tokio::spawn(async move { capture(&gateway, "/u/reflect/reflect", &token, &body).await });
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    agent
        .revoke(&issued.grant.id, "revoked while its answer streams")
        .await
        .expect("the revocation");
    let captured = streaming.await.expect("the capture");
    let received = captured.chunks.concat().len();
    assert!(received > 0, "the answer had begun before the revocation");
    assert!(
        received < 30 * 5000,
        "the whole answer ({received} bytes) arrived after its grant was revoked"
    );
}

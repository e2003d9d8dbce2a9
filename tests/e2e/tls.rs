//! TLS on both listeners and client certificates as principals: https clients verify valetd's
//! certificate (unknown CA, expired and wrong-name certificates refused with a reason), the
//! gateway serves TLS too, a principal known by its SPIFFE ID needs no key, client certificates
//! from another CA or expired ones are refused, and rotated files take effect without a restart.

use std::path::{Path, PathBuf};
use std::time::Duration;

use valet_client::{Client, ClientConfig, ClientError, Credential, TlsOptions, TokenRequest};
use valet_core::Secret;
use valet_tests::pki::{Ca, ClientName, Validity};
use valet_tests::{AGENT_KEY, Deployment, Valetd, eventually, standard_config};

const BUILDER_SPIFFE_ID: &str = "spiffe://example.org/ns/ci/sa/builder";

/// A deployment serving TLS with a server certificate from `ca` for the loopback names, and a
/// client CA plus a principal known by its SPIFFE ID when `client_auth` is set.
fn tls_deployment(ca: &Ca, client_auth: Option<&str>) -> Deployment {
    let client_settings = match client_auth {
        None => String::new(),
        Some(mode) => format!("client_ca_file = \"client-ca.crt\"\nclient_auth = \"{mode}\"\n"),
    };
    let principal = if client_auth.is_some() {
        format!(
            "\n[[principal]]\nname = \"builder\"\nroles = [\"agent\"]\nscopes = [\"limited\"]\n[[principal.certificate]]\nspiffe_id = \"{BUILDER_SPIFFE_ID}\"\n"
        )
    } else {
        String::new()
    };
    let config = standard_config(&principal).replace(
        "grant_retention = \"1h\"\n",
        &format!(
            "grant_retention = \"1h\"\ngateway_listen = \"127.0.0.1:0\"\ntls_cert_file = \"server.crt\"\ntls_key_file = \"server.key\"\n{client_settings}"
        ),
    );
    let deployment = Deployment::new(&config);
    ca.server_certificate(
        &["127.0.0.1", "localhost"],
        Validity::Current,
        deployment.directory.path(),
        "server",
    );
    ca.write_certificate(&deployment.path("ca.crt"));
    deployment
}

fn https(address: &str) -> String {
    address.replacen("http://", "https://", 1)
}

async fn connect(
    server: &str,
    key: Option<&str>,
    ca_file: Option<PathBuf>,
    client_certificate: Option<(PathBuf, PathBuf)>,
) -> Result<Client, ClientError> {
    let credential = match key {
        Some(key) => Credential::Key(Secret::from(key.to_string())),
        None => Credential::ClientCertificate,
    };
    let config = ClientConfig::with_credential(server, credential).with_tls(TlsOptions {
        ca_file,
        client_certificate,
    });
    Client::connect(config).await
}

/// The error text of connecting and making one call (a TLS 1.3 client-certificate refusal
/// arrives with the first call, not the handshake).
async fn refusal(
    server: &str,
    key: Option<&str>,
    ca_file: Option<PathBuf>,
    client_certificate: Option<(PathBuf, PathBuf)>,
) -> String {
    match connect(server, key, ca_file, client_certificate).await {
        Err(error) => error.to_string(),
        Ok(client) => match client
            .request_token(TokenRequest::new("limited", "tls-refusal"))
            .await
        {
            Err(error) => error.to_string(),
            Ok(_) => panic!("the call was expected to be refused but succeeded"),
        },
    }
}

fn curl(arguments: &[&str]) -> (bool, String) {
    let output = std::process::Command::new("curl")
        .args(["--silent", "--show-error", "--max-time", "10"])
        .args(arguments)
        .output()
        .expect("run curl");
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

fn path_text(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 temp path")
}

#[tokio::test]
async fn both_listeners_serve_tls_and_clients_verify_valetds_certificate() {
    let ca = Ca::new("valet test CA");
    let deployment = tls_deployment(&ca, None);
    let valetd = deployment.start(&[]);
    let server = https(&valetd.address);
    let ca_file = deployment.path("ca.crt");

    // A client that trusts the CA gets its token over TLS.
    let client = connect(&server, Some(AGENT_KEY), Some(ca_file.clone()), None)
        .await
        .expect("connect over TLS");
    let issued = client
        .request_token(TokenRequest::new("limited", "tls-task"))
        .await
        .expect("a token over TLS");
    assert!(!issued.token_str().is_empty());

    // The system's roots do not know the throwaway CA.
    let unknown = refusal(&server, Some(AGENT_KEY), None, None).await;
    assert!(
        unknown.contains("not signed by a CA this client trusts"),
        "{unknown}"
    );
    // http:// to a TLS listener never works by accident.
    let plaintext = refusal(&valetd.address, Some(AGENT_KEY), None, None).await;
    assert!(plaintext.contains("use https://"), "{plaintext}");
    // A scheme the client cannot honour, or none, is named.
    let no_scheme = refusal(
        valetd.address.trim_start_matches("http://"),
        Some(AGENT_KEY),
        None,
        None,
    )
    .await;
    assert!(no_scheme.contains("there is no scheme"), "{no_scheme}");
    // A scheme in capitals means what it says: HTTPS is TLS.
    let capitals = server.replacen("https://", "HTTPS://", 1);
    let client = connect(&capitals, Some(AGENT_KEY), Some(ca_file.clone()), None)
        .await
        .expect("HTTPS:// connects over TLS");
    client
        .request_token(TokenRequest::new("limited", "capital-scheme"))
        .await
        .expect("a token over TLS");
    let http_with_ca = refusal(
        &valetd.address,
        Some(AGENT_KEY),
        Some(ca_file.clone()),
        None,
    )
    .await;
    assert!(http_with_ca.contains("use https://"), "{http_with_ca}");

    // The gateway listener serves TLS with the same certificate.
    let gateway = https(valetd.gateway.as_deref().expect("a gateway"));
    let (ok, body) = curl(&[
        "--cacert",
        path_text(&ca_file),
        &format!("{gateway}/healthz"),
    ]);
    assert!(ok && body.contains("\"ok\""), "{body}");
    let (ok, body) = curl(&[&format!("{gateway}/healthz")]);
    assert!(
        !ok,
        "curl without the CA must refuse the certificate: {body}"
    );
    let (ok, body) = curl(&[&format!(
        "{}/healthz",
        gateway.replacen("https://", "http://", 1)
    )]);
    assert!(!ok, "plaintext to the TLS gateway must fail: {body}");
}

#[tokio::test]
async fn expired_and_wrong_name_server_certificates_are_refused_with_the_reason() {
    let ca = Ca::new("valet test CA");
    let deployment = tls_deployment(&ca, None);
    let ca_file = deployment.path("ca.crt");
    // A certificate for another name.
    ca.server_certificate(
        &["valet.internal.example"],
        Validity::Current,
        deployment.directory.path(),
        "server",
    );
    let valetd = deployment.start(&[]);
    let server = https(&valetd.address);
    let wrong_name = refusal(&server, Some(AGENT_KEY), Some(ca_file.clone()), None).await;
    assert!(
        wrong_name.contains("does not name the host"),
        "{wrong_name}"
    );
    drop(valetd);

    ca.server_certificate(
        &["127.0.0.1", "localhost"],
        Validity::Expired,
        deployment.directory.path(),
        "server",
    );
    let valetd = deployment.start(&[]);
    let expired = refusal(
        &https(&valetd.address),
        Some(AGENT_KEY),
        Some(ca_file),
        None,
    )
    .await;
    assert!(expired.contains("has expired"), "{expired}");
}

#[tokio::test]
async fn a_principal_known_by_its_spiffe_id_needs_no_key_and_foreign_certificates_are_refused() {
    let ca = Ca::new("valet test CA");
    let client_ca = Ca::new("workload CA");
    let deployment = tls_deployment(&ca, Some("optional"));
    client_ca.write_certificate(&deployment.path("client-ca.crt"));
    let directory = deployment.directory.path();
    let builder = client_ca.client_certificate(
        ClientName::SpiffeId(BUILDER_SPIFFE_ID),
        Validity::Current,
        directory,
        "builder",
    );
    let valetd = deployment.start(&[]);
    let server = https(&valetd.address);
    let ca_file = Some(deployment.path("ca.crt"));

    // The certificate alone authenticates the principal; the audit record says how.
    let client = connect(&server, None, ca_file.clone(), Some(builder.clone()))
        .await
        .expect("connect with a client certificate");
    let issued = client
        .request_token(TokenRequest::new("limited", "spiffe-task"))
        .await
        .expect("a token for the certificate's principal");
    assert_eq!(issued.grant.principal, "builder");
    let records = deployment.audit_records();
    let issue = records
        .iter()
        .find(|record| {
            record["action"] == "token.issue" && record["grant_id"] == issued.grant.id.as_str()
        })
        .expect("an issue record");
    assert_eq!(issue["auth_method"], "client_certificate");
    assert_eq!(issue["auth_subject"], BUILDER_SPIFFE_ID);
    assert_eq!(issue["auth_fingerprint"].as_str().map(str::len), Some(64));
    // It asks only for what its principal may.
    let other_scope = client
        .request_token(TokenRequest::new("deploy-staging", "spiffe-task"))
        .await
        .expect_err("builder may not request deploy-staging");
    assert_eq!(other_scope.code(), Some(tonic::Code::PermissionDenied));

    // With client_auth = "optional", a key still works without a certificate.
    let agent = connect(&server, Some(AGENT_KEY), ca_file.clone(), None)
        .await
        .expect("connect with a key");
    agent
        .request_token(TokenRequest::new("limited", "key-task"))
        .await
        .expect("a key-authenticated token");
    // A key and a certificate naming different principals are refused.
    let mixed = refusal(
        &server,
        Some(AGENT_KEY),
        ca_file.clone(),
        Some(builder.clone()),
    )
    .await;
    assert!(
        mixed.contains("names principal \"builder\" but the bearer credential names"),
        "{mixed}"
    );

    // A certificate from a CA valetd does not trust, or an expired one, ends the connection.
    let stranger_ca = Ca::new("stranger CA");
    let foreign = stranger_ca.client_certificate(
        ClientName::SpiffeId(BUILDER_SPIFFE_ID),
        Validity::Current,
        directory,
        "foreign",
    );
    let foreign_refusal = refusal(&server, None, ca_file.clone(), Some(foreign)).await;
    assert!(
        foreign_refusal.contains("refused the client certificate"),
        "{foreign_refusal}"
    );
    let expired = client_ca.client_certificate(
        ClientName::SpiffeId(BUILDER_SPIFFE_ID),
        Validity::Expired,
        directory,
        "expired",
    );
    let expired_refusal = refusal(&server, None, ca_file.clone(), Some(expired)).await;
    assert!(
        expired_refusal.contains("refused the client certificate"),
        "{expired_refusal}"
    );
    // A valid certificate whose name no principal lists authenticates nobody.
    let unlisted = client_ca.client_certificate(
        ClientName::DnsName("someone.ci.example"),
        Validity::Current,
        directory,
        "unlisted",
    );
    let unlisted_refusal = refusal(&server, None, ca_file, Some(unlisted)).await;
    assert!(
        unlisted_refusal.contains("names no principal"),
        "{unlisted_refusal}"
    );
}

#[tokio::test]
async fn a_required_client_certificate_is_asked_for_by_name() {
    let ca = Ca::new("valet test CA");
    let client_ca = Ca::new("workload CA");
    let deployment = tls_deployment(&ca, Some("required"));
    client_ca.write_certificate(&deployment.path("client-ca.crt"));
    let valetd = deployment.start(&[]);
    let missing = refusal(
        &https(&valetd.address),
        Some(AGENT_KEY),
        Some(deployment.path("ca.crt")),
        None,
    )
    .await;
    assert!(
        missing.contains("requires a client certificate"),
        "{missing}"
    );
}

#[tokio::test]
async fn rotated_tls_files_take_effect_without_a_restart_and_broken_ones_are_refused() {
    let ca = Ca::new("valet test CA");
    let deployment = tls_deployment(&ca, None);
    let valetd: Valetd = deployment.start(&[]);
    let server = https(&valetd.address);
    let old_ca = deployment.path("ca.crt");

    // Broken files (a key that does not fit the certificate) are refused and audited; the
    // material in force stays.
    let spare = tempfile::tempdir().expect("a temp dir");
    let (_, other_key) =
        ca.server_certificate(&["127.0.0.1"], Validity::Current, spare.path(), "spare");
    std::fs::copy(&other_key, deployment.path("server.key")).expect("replace the key");
    let refused = eventually(Duration::from_secs(15), || async {
        deployment
            .audit_records()
            .iter()
            .any(|record| record["action"] == "tls.reload" && record["outcome"] == "failed")
    })
    .await;
    assert!(
        refused,
        "a refused TLS reload is audited; valetd printed:\n{}",
        valetd.output()
    );
    connect(&server, Some(AGENT_KEY), Some(old_ca.clone()), None)
        .await
        .expect("the old certificate still serves")
        .request_token(TokenRequest::new("limited", "after-refusal"))
        .await
        .expect("a token after the refused reload");

    // A certificate from a new CA is picked up by the file check.
    let new_ca = Ca::new("rotated CA");
    new_ca.server_certificate(
        &["127.0.0.1", "localhost"],
        Validity::Current,
        deployment.directory.path(),
        "server",
    );
    let new_ca_file = deployment.path("new-ca.crt");
    new_ca.write_certificate(&new_ca_file);
    let rotated = eventually(Duration::from_secs(15), || async {
        match connect(&server, Some(AGENT_KEY), Some(new_ca_file.clone()), None).await {
            Ok(client) => client
                .request_token(TokenRequest::new("limited", "after-rotation"))
                .await
                .is_ok(),
            Err(_) => false,
        }
    })
    .await;
    assert!(
        rotated,
        "the rotated certificate serves; valetd printed:\n{}",
        valetd.output()
    );
    let reloaded = deployment
        .audit_records()
        .into_iter()
        .find(|record| record["action"] == "tls.reload" && record["outcome"] == "allowed");
    let reloaded = reloaded.expect("an audited TLS reload");
    assert_eq!(reloaded["trigger"], "file change");
    assert_eq!(
        reloaded["certificate_sha256"].as_str().map(str::len),
        Some(64)
    );
    // The old CA no longer verifies the new certificate.
    let stale = refusal(&server, Some(AGENT_KEY), Some(old_ca), None).await;
    assert!(
        stale.contains("not signed by a CA this client trusts"),
        "{stale}"
    );
}

/// Runs the Python grpcio client (tests/clients/python_client.py) from the test venv.
fn python_client(arguments: &[&str]) -> serde_json::Value {
    let repository = valet_tests::frameworks::repository();
    let python = repository.join("var/venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run ./scripts/test.sh, which installs grpcio and grpcio-tools into the venv",
        python.display()
    );
    let output = std::process::Command::new(python)
        .arg(repository.join("tests/clients/python_client.py"))
        .arg("--repository")
        .arg(&repository)
        .args(arguments)
        .output()
        .expect("run the Python client");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the Python client failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|_| panic!("one JSON line: {stdout}"))
}

#[tokio::test]
async fn a_python_grpcio_client_interoperates_over_tls_and_mtls() {
    let ca = Ca::new("valet test CA");
    let client_ca = Ca::new("workload CA");
    let deployment = tls_deployment(&ca, Some("optional"));
    client_ca.write_certificate(&deployment.path("client-ca.crt"));
    let directory = deployment.directory.path();
    let (builder_cert, builder_key) = client_ca.client_certificate(
        ClientName::SpiffeId(BUILDER_SPIFFE_ID),
        Validity::Current,
        directory,
        "builder",
    );
    let valetd = deployment.start(&[]);
    let target = valetd.address.trim_start_matches("http://").to_string();
    let ca_file = deployment.path("ca.crt");
    let ca_text = path_text(&ca_file).to_string();

    // TLS, authenticated with a key.
    let with_key = python_client(&[
        "--target",
        &target,
        "--ca-file",
        &ca_text,
        "--key",
        AGENT_KEY,
        "--scope",
        "limited",
        "--task",
        "python-tls",
    ]);
    assert_eq!(with_key["principal"], "agent", "{with_key}");
    assert_eq!(with_key["token_parts"], 3, "{with_key}");

    // mTLS: the certificate alone names the principal.
    let with_certificate = python_client(&[
        "--target",
        &target,
        "--ca-file",
        &ca_text,
        "--cert-file",
        path_text(&builder_cert),
        "--key-file",
        path_text(&builder_key),
        "--scope",
        "limited",
        "--task",
        "python-mtls",
    ]);
    assert_eq!(
        with_certificate["principal"], "builder",
        "{with_certificate}"
    );

    // A CA that did not issue valetd's certificate: the handshake fails, nothing is sent.
    let stranger = Ca::new("stranger CA");
    let stranger_file = deployment.path("stranger.crt");
    stranger.write_certificate(&stranger_file);
    let refused = python_client(&[
        "--target",
        &target,
        "--ca-file",
        path_text(&stranger_file),
        "--key",
        AGENT_KEY,
        "--scope",
        "limited",
        "--task",
        "python-wrong-ca",
    ]);
    assert_eq!(refused["error"], "UNAVAILABLE", "{refused}");
}

/// Calls on `client`'s open connection until a call is refused (within 20 s): the refusal.
async fn first_refusal(client: &Client, task: &str) -> Option<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        if let Err(error) = client
            .request_token(TokenRequest::new("limited", task))
            .await
        {
            return Some(error.to_string());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    None
}

/// The records of authentications refused for a client certificate.
fn certificate_refusals(deployment: &Deployment) -> Vec<String> {
    deployment
        .audit_records()
        .iter()
        .filter(|record| {
            record["action"] == "principal.authenticate"
                && record["reason_kind"] == "client_certificate"
        })
        .map(|record| record["reason"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test]
async fn a_client_certificate_is_checked_at_every_request_on_an_open_connection() {
    let ca = Ca::new("valet test CA");
    let client_ca = Ca::new("workload CA");
    let deployment = tls_deployment(&ca, Some("optional"));
    client_ca.write_certificate(&deployment.path("client-ca.crt"));
    let directory = deployment.directory.path();
    let short = client_ca.client_certificate(
        ClientName::SpiffeId(BUILDER_SPIFFE_ID),
        Validity::ForSeconds(4),
        directory,
        "short",
    );
    let lasting = client_ca.client_certificate(
        ClientName::SpiffeId(BUILDER_SPIFFE_ID),
        Validity::Current,
        directory,
        "lasting",
    );
    let valetd = deployment.start(&[]);
    let server = https(&valetd.address);
    let ca_file = Some(deployment.path("ca.crt"));

    // A certificate that expires while its connection is open stops authenticating on it.
    let client = connect(&server, None, ca_file.clone(), Some(short.clone()))
        .await
        .expect("connect with a certificate valid for a few seconds");
    client
        .request_token(TokenRequest::new("limited", "before-expiry"))
        .await
        .expect("a token while the certificate is valid");
    let last_error = first_refusal(&client, "after-expiry")
        .await
        .expect("the expired certificate kept authenticating its connection");
    assert!(last_error.contains("expired at"), "{last_error}");
    assert!(
        certificate_refusals(&deployment)
            .iter()
            .any(|reason| reason.contains("expired at")),
        "the refusal is audited"
    );
    // A new connection with it fails at the handshake.
    let again = refusal(&server, None, ca_file.clone(), Some(short)).await;
    assert!(again.contains("refused the client certificate"), "{again}");

    // Removing the CA from server.client_ca_file ends what its certificates authenticate, on
    // connections already open too.
    let open = connect(&server, None, ca_file.clone(), Some(lasting))
        .await
        .expect("connect with a current certificate");
    open.request_token(TokenRequest::new("limited", "before-the-swap"))
        .await
        .expect("a token while its CA is configured");
    Ca::new("next workload CA").write_certificate(&deployment.path("client-ca.crt"));
    let last_error = first_refusal(&open, "after-the-swap")
        .await
        .expect("a certificate from a removed CA kept authenticating its connection");
    assert!(
        last_error.contains("no longer in server.client_ca_file"),
        "{last_error}"
    );
}

#[tokio::test]
async fn a_removed_ca_ends_its_certificates_whatever_else_their_chains_carry() {
    let ca = Ca::new("valet test CA");
    let removed = Ca::new("workload CA");
    let kept = Ca::new("second workload CA");
    // The same name under a new key, as when a CA is re-keyed.
    let rekeyed = Ca::new("workload CA");
    let deployment = tls_deployment(&ca, Some("optional"));
    let directory = deployment.directory.path();
    let pem = |ca: &Ca, stem: &str| {
        let path = directory.join(format!("{stem}.pem"));
        ca.write_certificate(&path);
        std::fs::read_to_string(path).unwrap()
    };
    let (removed_pem, kept_pem, rekeyed_pem) = (
        pem(&removed, "removed"),
        pem(&kept, "kept"),
        pem(&rekeyed, "rekeyed"),
    );
    std::fs::write(
        deployment.path("client-ca.crt"),
        format!("{removed_pem}{kept_pem}{rekeyed_pem}"),
    )
    .unwrap();
    let plain = removed.client_certificate(
        ClientName::SpiffeId(BUILDER_SPIFFE_ID),
        Validity::Current,
        directory,
        "plain",
    );
    // The attacker's move: another trusted CA's (public) certificate appended to its chain.
    let padded = removed.client_certificate(
        ClientName::SpiffeId(BUILDER_SPIFFE_ID),
        Validity::Current,
        directory,
        "padded",
    );
    let leaf = std::fs::read_to_string(&padded.0).unwrap();
    std::fs::write(&padded.0, format!("{leaf}{kept_pem}")).unwrap();
    let valetd = deployment.start(&[]);
    let server = https(&valetd.address);
    let ca_file = Some(deployment.path("ca.crt"));
    let mut open = Vec::new();
    for (name, certificate) in [("padded", padded), ("plain", plain)] {
        let client = connect(&server, None, ca_file.clone(), Some(certificate))
            .await
            .unwrap_or_else(|error| panic!("connect with the {name} certificate: {error}"));
        client
            .request_token(TokenRequest::new("limited", name))
            .await
            .unwrap_or_else(|error| panic!("a token with the {name} certificate: {error}"));
        open.push((name, client));
    }
    // The CA that issued both is removed; the one appended and the re-keyed one stay.
    std::fs::write(
        deployment.path("client-ca.crt"),
        format!("{kept_pem}{rekeyed_pem}"),
    )
    .unwrap();
    for (name, client) in &open {
        let refused = first_refusal(client, &format!("{name}-after"))
            .await
            .unwrap_or_else(|| panic!("the {name} certificate kept authenticating its connection"));
        assert!(
            refused.contains("no longer in server.client_ca_file"),
            "{name}: {refused}"
        );
    }
}

/// Opens a TLS 1.3 connection to `address` with `config`, reads what the server sends after the
/// handshake (its session tickets, if any), and says whether the handshake resumed a session.
async fn handshake(address: &str, config: std::sync::Arc<rustls::ClientConfig>) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(address.trim_start_matches("http://"))
        .await
        .expect("connect");
    let connector = tokio_rustls::TlsConnector::from(config);
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut stream = connector.connect(name, tcp).await.expect("a TLS handshake");
    let resumed = stream.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .expect("the HTTP/2 preface");
    let mut buffer = [0u8; 1024];
    let _ = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buffer)).await;
    resumed
}

fn client_config(
    ca_file: &Path,
    certificate: Option<(PathBuf, PathBuf)>,
) -> std::sync::Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for certificate in CertificateDer::pem_file_iter(ca_file).unwrap() {
        roots.add(certificate.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots);
    let mut config = match certificate {
        Some((certificate, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(certificate)
                    .unwrap()
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_file(key).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    std::sync::Arc::new(config)
}

#[tokio::test]
async fn no_tls_session_is_resumed_where_client_certificates_authenticate() {
    // Without client CAs a session resumes (so the check below can tell)…
    let ca = Ca::new("valet test CA");
    let plain = tls_deployment(&ca, None);
    let plain_valetd = plain.start(&[]);
    let config = client_config(&plain.path("ca.crt"), None);
    assert!(!handshake(&plain_valetd.address, config.clone()).await);
    assert!(
        handshake(&plain_valetd.address, config).await,
        "the second handshake resumes the first's session"
    );

    // …with them, every connection is a full handshake that shows its certificate.
    let client_ca = Ca::new("workload CA");
    let deployment = tls_deployment(&ca, Some("optional"));
    client_ca.write_certificate(&deployment.path("client-ca.crt"));
    let builder = client_ca.client_certificate(
        ClientName::SpiffeId(BUILDER_SPIFFE_ID),
        Validity::Current,
        deployment.directory.path(),
        "builder",
    );
    let valetd = deployment.start(&[]);
    for certificate in [Some(builder), None] {
        let config = client_config(&deployment.path("ca.crt"), certificate);
        assert!(!handshake(&valetd.address, config.clone()).await);
        assert!(
            !handshake(&valetd.address, config).await,
            "no session is resumed"
        );
    }
}

#[tokio::test]
async fn a_python_grpcio_client_with_a_session_cache_is_refused_once_its_certificate_expires() {
    let ca = Ca::new("valet test CA");
    let client_ca = Ca::new("workload CA");
    let deployment = tls_deployment(&ca, Some("optional"));
    client_ca.write_certificate(&deployment.path("client-ca.crt"));
    let (certificate, key) = client_ca.client_certificate(
        ClientName::SpiffeId(BUILDER_SPIFFE_ID),
        Validity::ForSeconds(4),
        deployment.directory.path(),
        "short",
    );
    let valetd = deployment.start(&[]);
    let target = valetd.address.trim_start_matches("http://").to_string();
    let ca_file = deployment.path("ca.crt");
    let outcome = python_client(&[
        "--target",
        &target,
        "--ca-file",
        path_text(&ca_file),
        "--cert-file",
        path_text(&certificate),
        "--key-file",
        path_text(&key),
        "--scope",
        "limited",
        "--task",
        "python-expiring",
        "--until-refused",
        "20",
    ]);
    assert_eq!(outcome["first"]["principal"], "builder", "{outcome}");
    assert_eq!(outcome["refused"]["error"], "UNAUTHENTICATED", "{outcome}");
    assert!(
        outcome["refused"]["details"]
            .as_str()
            .unwrap_or_default()
            .contains("expired at"),
        "{outcome}"
    );
    // A new channel sharing the session cache gets no resumed session to ride on.
    assert!(outcome["new_channel"]["error"].is_string(), "{outcome}");
    assert_ne!(outcome["new_channel"]["error"], "OK", "{outcome}");
}

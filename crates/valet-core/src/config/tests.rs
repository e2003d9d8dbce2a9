//! Config validation: the shipped examples parse; every kind of mistake is reported, all at once.

use std::path::Path;

use super::*;

pub(super) const EXAMPLES: &[(&str, &str)] = &[
    (
        "deploy/examples/valet.toml",
        include_str!("../../../../deploy/examples/valet.toml"),
    ),
    (
        "deploy/examples/railway.toml",
        include_str!("../../../../deploy/examples/railway.toml"),
    ),
    (
        "deploy/examples/github.toml",
        include_str!("../../../../deploy/examples/github.toml"),
    ),
    (
        "deploy/examples/aws.toml",
        include_str!("../../../../deploy/examples/aws.toml"),
    ),
    (
        "deploy/examples/mcp.toml",
        include_str!("../../../../deploy/examples/mcp.toml"),
    ),
];

#[test]
fn every_example_config_in_the_repository_parses() {
    for (name, text) in EXAMPLES {
        let config = Config::parse(text, Path::new("/repo/deploy/examples"))
            .unwrap_or_else(|errors| panic!("{name}: {errors}"));
        assert!(!config.scopes.is_empty(), "{name}");
        assert!(
            config.audit.path.starts_with("/repo/deploy/examples/var"),
            "{name}"
        );
    }
}

#[test]
fn every_mistake_is_reported_at_once_with_its_key_path() {
    let text = r#"
[server]
listen = "not-an-address"
issuer = "https://valet.test"
max_ttl = "1h"
colour = "blue"

[seal]
key_file = "a"
key_env = "B"

[audit]
path = "audit.jsonl"

[[credential]]
name = "railway"

[[credential]]
name = "bad name!"
env = "X"

[[scope]]
name = "too-long"
credential = "nope"
environment = "staging"
audience = "railway"
default_ttl = "5 parsecs"
max_ttl = "2h"
max_uses = 0
[scope.params.project]
pattern = "(unclosed"
[scope.params.Region]
values = ["eu"]

[[scope]]
name = "too-long"
credential = "railway"
environment = "staging"
audience = "railway"
default_ttl = "10m"
max_ttl = "5m"

[[principal]]
name = "ci-agent"
roles = ["agent", "superuser"]
key_sha256 = "xyz"
scopes = ["missing-scope"]
"#;
    let errors = Config::parse(text, Path::new("/etc/valet")).unwrap_err();
    let rendered: Vec<String> = errors.0.iter().map(ToString::to_string).collect();
    let expected = [
        "server.colour: unknown key",
        "server.listen: \"not-an-address\" is not a valid socket address",
        "server.data_dir: missing",
        "seal: set both key_file and key_env",
        "credential[0]: set neither file nor env",
        "credential[1].name: \"bad name!\" is not a valid name",
        "scope[0].credential: names credential \"nope\", which is not defined; defined credentials: []",
        "scope[0].max_ttl: 2h exceeds server.max_ttl 1h",
        "scope[0].default_ttl: \"5 parsecs\" is not a valid duration",
        "scope[0].max_uses: \"0\" is not a valid use count",
        "scope[0].params.project.pattern: \"(unclosed\" is not a valid pattern",
        "scope[0].params.Region: \"Region\" is not a valid parameter name",
        "scope[1].default_ttl: 10m exceeds scope[1].max_ttl 5m",
        "principal[0].roles[1]: \"superuser\" is not a valid role",
        "principal[0].key_sha256: \"xyz\" is not a valid key hash",
        "principal[0].scopes[0]: names scope \"missing-scope\", which is not defined",
    ];
    for wanted in expected {
        assert!(
            rendered.iter().any(|line| line.starts_with(wanted)),
            "missing {wanted:?} in:\n{}",
            rendered.join("\n")
        );
    }
    assert!(
        errors
            .to_string()
            .starts_with(&format!("the config has {} problems:", errors.0.len()))
    );
}

#[test]
fn a_duplicate_scope_name_is_reported() {
    let text = r#"
[server]
data_dir = "d"
issuer = "i"
max_ttl = "1h"
[audit]
path = "a"
[[credential]]
name = "c"
env = "C"
[[scope]]
name = "s"
credential = "c"
environment = "e"
audience = "a"
default_ttl = "1m"
max_ttl = "1m"
[[scope]]
name = "s"
credential = "c"
environment = "e"
audience = "a"
default_ttl = "1m"
max_ttl = "1m"
"#;
    let errors = Config::parse(text, Path::new("/")).unwrap_err();
    assert_eq!(
        errors.0[0].to_string(),
        "scope[1].name: \"s\" is defined more than once"
    );
}

#[test]
fn syntax_errors_say_where() {
    let errors = Config::parse("[server\nlisten = 1", Path::new("/")).unwrap_err();
    assert_eq!(errors.0.len(), 1);
    assert!(
        errors.0[0]
            .to_string()
            .starts_with("(file): the file is not valid TOML"),
        "{}",
        errors
    );
    // The line, its text and a caret, each on a line of its own.
    let text = errors.to_string();
    assert!(text.contains("line 1, column 8"), "{text}");
    assert!(text.contains("\n    1 | [server\n"), "{text}");
    assert!(
        text.lines().any(|line| line.trim_end().ends_with('^')),
        "{text}"
    );
    let errors = Config::parse("[server]\nmax_ttl = 5\n", Path::new("/")).unwrap_err();
    assert!(errors.to_string().contains("max_ttl"), "{errors}");
}

#[test]
fn two_principals_may_not_share_a_key() {
    let text = r#"
[server]
data_dir = "d"
issuer = "i"
max_ttl = "1h"
[audit]
path = "a"
[[principal]]
name = "a"
roles = ["agent"]
key_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
[[principal]]
name = "b"
roles = ["agent"]
key_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
"#;
    let errors = Config::parse(text, Path::new("/")).unwrap_err();
    assert!(matches!(errors.0[0].kind, ProblemKind::SharedKey { .. }));
}

#[test]
fn gateway_mistakes_are_reported_with_their_key_paths() {
    let text = r#"
[server]
data_dir = "d"
issuer = "i"
max_ttl = "1h"
gateway_listen = "nowhere"
metrics_listen = "somewhere"
otlp_endpoint = "collector:4318"
console_url = "valet.example.com"
console_session_ttl = "2d"
[audit]
path = "a"
[[credential]]
name = "railway"
env = "RAILWAY_TOKEN"
[[upstream]]
name = "railway"
base_url = "ftp://backboard.railway.app"
credential = "railway"
[upstream.inject]
header = { Authorization = "Bearer token" }
[[upstream]]
name = "rest"
base_url = "https://api.example.com/v1"
credential = "missing"
headers = { Authorization = "x" }
forward_headers = ["X-HTTP-Method-Override", "x-github-api-version", "bad header"]
[upstream.inject]
query = { api_key = "{secret}" }
[[scope]]
name = "gw"
upstream = "rest"
audience = "something-else"
environment = "e"
default_ttl = "1m"
max_ttl = "1m"
[scope.params.project]
pattern = "[a-z]+"
[[scope.allow]]
method = "BREW"
path = "/v1/{tenant}/x"
query = { page = "{tenant}", state = { pattern = "(" }, kind = { one_of = [] } }
[[scope.allow]]
path = "v1/**/x"
max_body = 0
[[scope.allow]]
path = "/graphql"
query = { page = "1" }
[scope.allow.graphql]
mutation = ["customDomainCreate"]
arguments = { "volumeDelete.volumeId" = "x", "bad path" = "y" }
[[scope.allow]]
method = "GET"
path = "/items"
query = { api_key = "{project}" }
[[scope]]
name = "no-rules"
upstream = "rest"
environment = "e"
default_ttl = "1m"
max_ttl = "1m"
[[scope]]
name = "no-upstream"
credential = "railway"
audience = "a"
environment = "e"
default_ttl = "1m"
max_ttl = "1m"
[[scope.allow]]
method = "GET"
path = "/"
"#;
    let errors = Config::parse(text, Path::new("/")).unwrap_err();
    let rendered: Vec<String> = errors.0.iter().map(ToString::to_string).collect();
    for wanted in [
        "server.gateway_listen: \"nowhere\" is not a valid socket address",
        "server.metrics_listen: \"somewhere\" is not a valid socket address",
        "server.otlp_endpoint: \"collector:4318\" is not a valid OTLP/HTTP endpoint",
        "server.console_url: \"valet.example.com\" is not a valid console URL",
        "server.console_session_ttl: \"2d\" is not a valid session lifetime; expected from 1s to 12h",
        "upstream[0].base_url: \"ftp://backboard.railway.app\" is not a valid base URL",
        "upstream[0].inject: \"Bearer token\" is not a valid template; expected text containing {secret}",
        "upstream[1].credential: names credential \"missing\", which is not defined",
        "upstream[1].headers.Authorization: \"Authorization\" is not a valid extra header",
        "scope[0].audience: \"something-else\" is not a valid audience; expected the upstream's name \"rest\"",
        "scope[0].allow[0].method: \"BREW\" is not a valid method",
        "scope[0].allow[0].path: \"/v1/{tenant}/x\" is not a valid path pattern; expected placeholders naming this scope's params [project]",
        "scope[0].allow[1]: set neither method nor methods",
        "scope[0].allow[1].path: \"v1/**/x\" is not a valid path pattern; expected must start with '/'",
        "scope[0].allow[1].max_body: \"0\" is not a valid byte count",
        "upstream[1].forward_headers[0]: \"X-HTTP-Method-Override\" is not a valid forwarded header; expected any header but this one: it overrides the method the upstream executes",
        "upstream[1].forward_headers[2]: \"bad header\" is not a valid header name",
        "scope[0].allow[3].query.api_key: \"api_key\" is not a valid query parameter",
        "scope[0].allow[0].query.page: \"{tenant}\" is not a valid binding",
        "scope[0].allow[0].query.state: \"(\" is not a valid pattern",
        "scope[0].allow[0].query.kind: \"…\" is not a valid value rule",
        "scope[0].allow[2].query: \"…\" is not a valid query parameters on a GraphQL rule",
        "scope[0].allow[2].graphql.arguments.volumeDelete.volumeId: \"volumeDelete.volumeId\" is not a valid argument path; expected a path starting with a field this rule allows",
        "scope[0].allow[2].graphql.arguments.bad path: \"bad path\" is not a valid argument path",
        "scope[1].allow: \"[]\" is not a valid rule list",
        "scope[2].allow: \"[[scope.allow]]\" is not a valid rule list",
    ] {
        assert!(
            rendered.iter().any(|line| line.starts_with(wanted)),
            "missing {wanted:?} in:\n{}",
            rendered.join("\n")
        );
    }
}

#[test]
fn store_mistakes_are_reported_with_their_key_paths() {
    let base = r#"
[server]
data_dir = "data"
issuer = "https://valet.test"
max_ttl = "1h"
[audit]
path = "audit.jsonl"
"#;
    let problems = |store: &str| -> Vec<String> {
        match Config::parse(&format!("{base}{store}"), Path::new("/etc/valet")) {
            Ok(_) => Vec::new(),
            Err(errors) => errors.0.iter().map(ToString::to_string).collect(),
        }
    };
    let found = problems(
        r#"
[store]
engine = "etcd"
endpoints = ["https://10.0.0.1:2379", "http://10.0.0.2:2379"]
prefix = "valet"
username = "valet"
cert_file = "client.pem"
replica = "bad name!"
"#,
    );
    for wanted in [
        "store.endpoints[1]: \"http://10.0.0.2:2379\" is not a valid etcd endpoint; expected https://HOST:PORT",
        "store.ca_file: ",
        "store.prefix: \"valet\" is not a valid key prefix",
        "store.username: \"valet\" is not a valid etcd login",
        "store: \"cert_file/key_file\" is not a valid client certificate",
        "store.replica: \"bad name!\" is not a valid replica name",
    ] {
        assert!(
            found.iter().any(|problem| problem.starts_with(wanted)),
            "missing {wanted:?} in:\n{}",
            found.join("\n")
        );
    }
    assert!(
        problems("[store]\nengine = \"sled\"\nendpoints = [\"http://a:1\"]\n")
            .iter()
            .any(|problem| problem.starts_with("store.endpoints: ")),
    );
    assert!(
        problems("[store]\nengine = \"zookeeper\"\n")
            .iter()
            .any(|problem| problem.starts_with("store.engine: \"zookeeper\"")),
    );
    let config = Config::parse(
        &format!(
            "{base}[store]\nengine = \"etcd\"\nendpoints = [\"https://10.0.0.1:2379\"]\nca_file = \"ca.pem\"\ncert_file = \"c.pem\"\nkey_file = \"c.key\"\n"
        ),
        Path::new("/etc/valet"),
    )
    .unwrap();
    let StoreConfig::Etcd(etcd) = config.store else {
        panic!("etcd engine expected");
    };
    assert_eq!(etcd.prefix, "/valet");
    assert_eq!(
        etcd.ca_file.as_deref(),
        Some(Path::new("/etc/valet/ca.pem"))
    );
}

#[test]
fn etcd_off_loopback_needs_tls_and_authentication_unless_allowed() {
    let config = |store: &str| {
        format!(
            "[server]\ndata_dir = \"d\"\nissuer = \"i\"\nmax_ttl = \"1h\"\n[audit]\npath = \"a\"\n[store]\nengine = \"etcd\"\n{store}"
        )
    };
    let refused = Config::parse(
        &config("endpoints = [\"http://10.1.2.3:2379\"]\n"),
        Path::new("/"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        refused.contains("lacks TLS and authentication"),
        "{refused}"
    );
    assert!(
        Config::parse(
            &config("endpoints = [\"http://127.0.0.1:2379\"]\n"),
            Path::new("/")
        )
        .is_ok()
    );
    assert!(
        Config::parse(
            &config("endpoints = [\"http://10.1.2.3:2379\"]\nallow_insecure = true\n"),
            Path::new("/")
        )
        .is_ok()
    );
}

#[test]
fn listeners_off_loopback_are_named_and_insecure_plaintext_is_read() {
    let (_, example) = EXAMPLES[0];
    let config = Config::parse(example, Path::new("/")).unwrap();
    assert!(config.server.plaintext_listeners_off_loopback().is_empty());
    assert!(!config.server.insecure_plaintext);

    let exposed = example
        .replace(
            "listen = \"127.0.0.1:7470\"",
            "listen = \"0.0.0.0:7470\"\ninsecure_plaintext = true",
        )
        .replace(
            "gateway_listen = \"127.0.0.1:7471\"",
            "gateway_listen = \"[::1]:7471\"",
        );
    let config = Config::parse(&exposed, Path::new("/")).unwrap();
    assert!(config.server.insecure_plaintext);
    assert_eq!(
        config.server.plaintext_listeners_off_loopback(),
        vec![("gRPC", "0.0.0.0:7470".parse().unwrap())],
        "[::1] is loopback; 0.0.0.0 is every interface"
    );
}

#[test]
fn connection_limits_have_defaults_and_out_of_range_values_are_named() {
    let (_, example) = EXAMPLES[0];
    let config = Config::parse(example, Path::new("/")).unwrap();
    assert_eq!(config.server.max_connections, DEFAULT_MAX_CONNECTIONS);
    assert_eq!(config.server.idle_timeout, DEFAULT_IDLE_TIMEOUT);

    let broken = example.replace(
        "listen = \"127.0.0.1:7470\"",
        "listen = \"127.0.0.1:7470\"\nmax_connections = 0\nidle_timeout = \"2h\"",
    );
    let errors = Config::parse(&broken, Path::new("/"))
        .unwrap_err()
        .to_string();
    assert!(
        errors.contains("server.max_connections: \"0\"") && errors.contains("from 1 to 1000000"),
        "{errors}"
    );
    assert!(
        errors.contains("server.idle_timeout") && errors.contains("from 1s to 1h"),
        "{errors}"
    );
}

#[test]
fn a_reload_keeps_the_running_values_of_start_only_keys_and_names_them() {
    let (_, example) = EXAMPLES[0];
    let running = Config::parse(example, Path::new("/")).unwrap();
    let changed = example.replace(
        "listen = \"127.0.0.1:7470\"",
        "listen = \"127.0.0.1:7480\"\nidle_timeout = \"5m\"",
    );
    let mut reloaded = Config::parse(&changed, Path::new("/")).unwrap();
    let restart_only = reloaded.server.keep_start_only_keys(&running.server);
    assert_eq!(restart_only, vec!["server.listen", "server.idle_timeout"]);
    assert_eq!(reloaded.server.listen, running.server.listen);
    assert_eq!(reloaded.server.idle_timeout, running.server.idle_timeout);
    assert!(
        reloaded
            .server
            .keep_start_only_keys(&running.server)
            .is_empty()
    );
}

#[test]
fn tls_covers_both_listeners_and_its_keys_are_checked_together() {
    let (_, example) = EXAMPLES[0];
    let with_tls = example.replace(
        "listen = \"127.0.0.1:7470\"",
        "listen = \"0.0.0.0:7470\"\ntls_cert_file = \"tls/server.crt\"\ntls_key_file = \"tls/server.key\"\nclient_ca_file = \"tls/ca.crt\"\nclient_auth = \"required\"",
    );
    let config = Config::parse(&with_tls, Path::new("/etc/valet")).unwrap();
    let tls = config.server.tls.as_ref().expect("TLS configured");
    assert_eq!(tls.cert_file, Path::new("/etc/valet/tls/server.crt"));
    assert_eq!(tls.client_auth, ClientAuth::Required);
    assert!(
        config.server.plaintext_listeners_off_loopback().is_empty(),
        "TLS listeners off loopback are not plaintext"
    );

    let broken = example.replace(
        "listen = \"127.0.0.1:7470\"",
        "listen = \"127.0.0.1:7470\"\ntls_cert_file = \"server.crt\"\nclient_auth = \"sometimes\"",
    );
    let errors = Config::parse(&broken, Path::new("/"))
        .unwrap_err()
        .to_string();
    assert!(errors.contains("server.tls_key_file: missing"), "{errors}");
    assert!(
        errors.contains("server.client_auth: \"sometimes\"")
            && errors.contains("\"optional\" or \"required\""),
        "{errors}"
    );
    let no_tls = example.replace(
        "listen = \"127.0.0.1:7470\"",
        "listen = \"127.0.0.1:7470\"\nclient_ca_file = \"ca.crt\"",
    );
    let errors = Config::parse(&no_tls, Path::new("/"))
        .unwrap_err()
        .to_string();
    assert!(
        errors.contains("server.client_ca_file") && errors.contains("client certificates need TLS"),
        "{errors}"
    );
}

#[test]
fn principals_known_by_certificate_need_a_client_ca_and_one_name_each() {
    let (_, example) = EXAMPLES[0];
    let tls = "listen = \"127.0.0.1:7470\"\ntls_cert_file = \"s.crt\"\ntls_key_file = \"s.key\"\nclient_ca_file = \"ca.crt\"";
    let principals = "\n[[principal]]\nname = \"builder\"\nroles = [\"agent\"]\n[[principal.certificate]]\nspiffe_id = \"spiffe://example.org/ns/ci/sa/builder\"\n[[principal.certificate]]\ncommon_name = \"builder\"\n";
    let config = Config::parse(
        &format!(
            "{}{principals}",
            example.replace("listen = \"127.0.0.1:7470\"", tls)
        ),
        Path::new("/"),
    )
    .unwrap();
    let builder = &config.principals["builder"];
    assert_eq!(builder.key_sha256, None);
    assert_eq!(
        builder.certificates,
        vec![
            CertificateMatch::SpiffeId("spiffe://example.org/ns/ci/sa/builder".into()),
            CertificateMatch::CommonName("builder".into()),
        ]
    );

    // Without a client CA, a bad SPIFFE ID, two names in one entry, a name shared by two
    // principals, and a principal with no credential at all.
    let broken = format!(
        "{example}\n[[principal]]\nname = \"a\"\nroles = [\"agent\"]\n[[principal.certificate]]\nspiffe_id = \"https://example.org/a\"\n[[principal]]\nname = \"b\"\nroles = [\"agent\"]\n[[principal.certificate]]\ndns_name = \"b.example\"\ncommon_name = \"b\"\n[[principal]]\nname = \"c\"\nroles = [\"agent\"]\n"
    );
    let errors = Config::parse(&broken, Path::new("/"))
        .unwrap_err()
        .to_string();
    for expected in [
        "server.client_ca_file set",
        "spiffe://TRUST-DOMAIN/PATH",
        "exactly one of spiffe_id, dns_name, common_name",
        "principal without a credential",
    ] {
        assert!(errors.contains(expected), "{expected} in {errors}");
    }
    let shared = format!(
        "{}\n[[principal]]\nname = \"a\"\nroles = [\"agent\"]\n[[principal.certificate]]\ncommon_name = \"x\"\n[[principal]]\nname = \"b\"\nroles = [\"agent\"]\n[[principal.certificate]]\ncommon_name = \"x\"\n",
        example.replace("listen = \"127.0.0.1:7470\"", tls)
    );
    let errors = Config::parse(&shared, Path::new("/"))
        .unwrap_err()
        .to_string();
    assert!(
        errors.contains("common name x already authenticates principal \"a\""),
        "{errors}"
    );
}

#[test]
fn the_kubernetes_manifest_holds_a_valid_config_with_tls_and_an_issuer() {
    let manifest = include_str!("../../../../deploy/kubernetes/valet.yaml");
    let start = manifest
        .find("valet.toml: |\n")
        .expect("the ConfigMap holds valet.toml")
        + "valet.toml: |\n".len();
    let end = start + manifest[start..].find("\n---").expect("the ConfigMap ends");
    let text: String = manifest[start..end]
        .lines()
        .map(|line| line.strip_prefix("    ").unwrap_or(line))
        .collect::<Vec<_>>()
        .join("\n");
    let config =
        Config::parse(&text, Path::new("/etc/valet")).unwrap_or_else(|errors| panic!("{errors}"));
    assert!(config.server.tls.is_some());
    assert!(config.server.plaintext_listeners_off_loopback().is_empty());
    assert_eq!(
        config.principals["ci-builder"].identities[0].issuer,
        "kubernetes"
    );
}

#[test]
fn mcp_upstreams_and_scopes_parse_and_their_mistakes_are_reported_with_key_paths() {
    let valid = r#"
[server]
data_dir = "d"
issuer = "i"
max_ttl = "1h"
[audit]
path = "a"
[[credential]]
name = "deploy"
env = "DEPLOY_TOKEN"
[[upstream]]
name = "deploy-remote"
kind = "mcp"
base_url = "https://mcp.deploy.example/mcp"
credential = "deploy"
[upstream.inject]
header = { Authorization = "Bearer {secret}" }
[[upstream]]
name = "deploy-stdio"
kind = "mcp"
command = "deploy-mcp"
args = ["--stdio"]
env = { DEPLOY_TOKEN = "{secret}", LOG_LEVEL = "info" }
working_dir = "servers"
idle_timeout = "2m"
credential = "deploy"
[[scope]]
name = "agent"
upstream = "deploy-remote"
environment = "staging"
default_ttl = "5m"
max_ttl = "10m"
[scope.params.project]
pattern = "p-[a-z]+"
[scope.mcp]
resources = ["deploy://projects/{project}/*"]
prompts = ["summarise_*"]
client_requests = ["elicitation"]
[[scope.mcp.tool]]
name = "list_*"
[[scope.mcp.tool]]
name = "create_custom_domain"
arguments = { projectId = "{project}", environment = "staging", port = { min = 1, max = 65535 }, kind = { one_of = ["a", "b"] } }
required = ["projectId"]
forbidden = ["force"]
max_calls = 3
[[scope.mcp.tool]]
name = "delete_volume"
approval = { approvers = ["role:operator"], confirm = "environment" }
"#;
    let config = Config::parse(valid, Path::new("/etc/valet")).unwrap();
    let stdio = &config.upstreams["deploy-stdio"];
    assert_eq!(stdio.kind, UpstreamKind::Mcp);
    let Target::Process(server) = &stdio.target else {
        panic!("a stdio server");
    };
    assert_eq!(
        server.working_dir.as_deref(),
        Some(Path::new("/etc/valet/servers"))
    );
    assert_eq!(server.max_processes, gateway::DEFAULT_MAX_PROCESSES);
    assert_eq!(
        server.starts_per_principal,
        gateway::DEFAULT_STARTS_PER_PRINCIPAL
    );
    assert_eq!(server.idle_timeout, Duration::from_secs(120));
    let allow = config.scopes["agent"].mcp.as_ref().unwrap();
    assert_eq!(allow.tools.len(), 3);
    assert_eq!(allow.tools[1].max_calls, Some(3));
    assert!(allow.tools[2].approval.is_some());
    assert_eq!(allow.tools[1].to_string(), "tool[1] create_custom_domain");
    assert!(
        allow
            .client_requests
            .contains(&crate::mcp::ClientRequest::Elicitation)
    );

    let mistakes = r#"
[server]
data_dir = "d"
issuer = "i"
max_ttl = "1h"
[audit]
path = "a"
[[credential]]
name = "deploy"
env = "DEPLOY_TOKEN"
[[upstream]]
name = "wrong-kind"
kind = "grpc"
base_url = "https://x.example"
credential = "deploy"
[upstream.inject]
header = { Authorization = "Bearer {secret}" }
[[upstream]]
name = "http-command"
command = "server"
env = { T = "{secret}" }
credential = "deploy"
[[upstream]]
name = "both"
kind = "mcp"
command = "server"
base_url = "https://x.example"
credential = "deploy"
env = { T = "{secret}" }
[[upstream]]
name = "no-secret"
kind = "mcp"
command = "server"
env = { T = "plain", "1BAD" = "{secret}" }
max_processes = 0
starts_per_principal = "often"
credential = "deploy"
[[upstream]]
name = "no-secret-ok"
kind = "mcp"
command = "server"
env = { T = "{secret}" }
credential = "deploy"
[[upstream]]
name = "remote"
kind = "mcp"
base_url = "https://x.example/mcp"
credential = "deploy"
args = ["--x"]
starts_per_principal = "5/min"
[upstream.inject]
header = { Authorization = "Bearer {secret}" }
[[scope]]
name = "mcp-without-table"
upstream = "remote"
environment = "e"
default_ttl = "1m"
max_ttl = "1m"
[[scope]]
name = "mcp-with-rules"
upstream = "remote"
environment = "e"
default_ttl = "1m"
max_ttl = "1m"
[scope.params.project]
pattern = "p-[a-z]+"
[[scope.allow]]
method = "POST"
path = "/"
[scope.mcp]
resources = ["deploy://{tenant}/*"]
client_requests = ["telepathy"]
[[scope.mcp.tool]]
name = "bad name!"
[[scope.mcp.tool]]
name = "create"
arguments = { projectId = "{tenant}", port = { min = 10, max = 1 }, both = { one_of = ["a"], min = 1 } }
required = ["force"]
forbidden = ["force"]
max_calls = 0
[[scope]]
name = "stdio-asks-client"
upstream = "no-secret-ok"
environment = "e"
default_ttl = "1m"
max_ttl = "1m"
[scope.mcp]
client_requests = ["sampling"]
[[scope.mcp.tool]]
name = "list_*"
[[scope]]
name = "empty-mcp"
upstream = "remote"
environment = "e"
default_ttl = "1m"
max_ttl = "1m"
[scope.mcp]
"#;
    let errors = Config::parse(mistakes, Path::new("/")).unwrap_err();
    let rendered: Vec<String> = errors.0.iter().map(ToString::to_string).collect();
    for wanted in [
        "upstream[0].kind: \"grpc\" is not a valid upstream kind",
        "upstream[1].command: \"…\" is not a valid command; expected only on an upstream of kind = \"mcp\"",
        "upstream[2]: set both base_url and command",
        "upstream[3].env.1BAD: \"1BAD\" is not a valid environment variable",
        "upstream[3].max_processes: \"0\" is not a valid process count",
        "upstream[3].starts_per_principal: \"often\" is not a valid rate",
        "upstream[5].args: \"…\" is not a valid args; expected only with command",
        "upstream[5].starts_per_principal: \"…\" is not a valid starts_per_principal; expected only with command",
        "scope[0].mcp: \"(missing)\" is not a valid [scope.mcp]",
        "scope[1].allow: \"[[scope.allow]]\" is not a valid rule list; expected none in a scope for an MCP upstream",
        "scope[1].mcp.resources[0]: \"deploy://{tenant}/*\" is not a valid resource pattern",
        "scope[1].mcp.client_requests[0]: \"telepathy\" is not a valid client request",
        "scope[1].mcp.tool[0].name: \"bad name!\" is not a valid tool name",
        "scope[1].mcp.tool[1].arguments.projectId: \"{tenant}\" is not a valid binding",
        "scope[1].mcp.tool[1].arguments.port: \"min = 10, max = 1\" is not a valid bounds",
        "scope[1].mcp.tool[1].arguments.both: \"…\" is not a valid argument rule",
        "scope[1].mcp.tool[1].forbidden: \"force\" is not a valid forbidden argument",
        "scope[1].mcp.tool[1].max_calls: \"0\" is not a valid call count",
        "scope[2].mcp.client_requests: \"[…]\" is not a valid client request list; expected none for an MCP server valetd runs",
        "scope[3].mcp: \"{}\" is not a valid [scope.mcp]",
    ] {
        assert!(
            rendered.iter().any(|line| line.starts_with(wanted)),
            "missing {wanted:?} in:\n{}",
            rendered.join("\n")
        );
    }
}

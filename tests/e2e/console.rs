//! The web console across replicas: two valetd on one etcd cluster, a login link made on one and
//! opened on the other, once, whichever replica is asked and even when both are asked at once;
//! a session opened on one replica works on the other, and logging out on one ends it on both.
//! A login link read from the process list by another user opens nothing without the code shown
//! to `valet console`; a session ends when the key that opened it is rotated, and operators list
//! and end sessions; behind a TLS-terminating nginx the cookie is `Secure`, `__Host-` and HSTS is
//! sent. (The browser tests in tests/console drive the pages themselves.)

use std::time::Duration;

use valet_client::v1;
use valet_tests::etcd::EtcdCluster;
use valet_tests::upstream::raw_exchange;
use valet_tests::{Deployment, OPERATOR_KEY, Valetd, binary, standard_config};

fn console_replicas(cluster: &EtcdCluster) -> (Vec<Deployment>, Vec<Valetd>) {
    let mut deployments = Vec::new();
    let mut valetds = Vec::new();
    for index in 0..2 {
        let config = standard_config(&format!(
            "\n[store]\nengine = \"etcd\"\nendpoints = {}\nprefix = \"/valet/console\"\nreplica = \"replica-{index}\"\n",
            cluster.endpoints_toml()
        ))
        .replacen(
            "grant_retention = \"1h\"\n",
            "grant_retention = \"1h\"\nconsole_listen = \"127.0.0.1:0\"\n",
            1,
        );
        let deployment = Deployment::new(&config);
        valetds.push(deployment.start(&[]));
        deployments.push(deployment);
    }
    (deployments, valetds)
}

/// A login link's pass and its code, made by `valetd` for the operator.
async fn login_link(valetd: &Valetd) -> (String, String) {
    let login = valetd
        .client(OPERATOR_KEY)
        .await
        .admin()
        .create_console_login(v1::CreateConsoleLoginRequest {})
        .await
        .expect("an operator gets a login link")
        .into_inner();
    let console = valetd.console.as_deref().expect("the console listens");
    let link = login
        .url
        .strip_prefix(&format!("http://{console}/login?link="))
        .unwrap_or_else(|| panic!("the link leads to this replica's console: {}", login.url));
    (link.to_string(), login.code)
}

/// POST /login on `valetd`'s console: the status, and the session cookie when one was set.
async fn open(valetd: &Valetd, (link, code): &(String, String)) -> (u16, Option<String>, String) {
    let console = valetd.console.as_deref().unwrap();
    let form = format!("link={link}&code={code}");
    let (status, head, body) = raw_exchange(
        console,
        "POST",
        "/login",
        &[("content-type", "application/x-www-form-urlencoded")],
        form.as_bytes(),
    )
    .await;
    let cookie = head
        .lines()
        .find_map(|line| line.strip_prefix("set-cookie: valet_console="))
        .and_then(|value| value.split(';').next())
        .map(str::to_string);
    (status, cookie, body)
}

async fn page(valetd: &Valetd, cookie: &str, path: &str) -> (u16, String) {
    let header = format!("valet_console={cookie}");
    let (status, _, body) = raw_exchange(
        valetd.console.as_deref().unwrap(),
        "GET",
        path,
        &[("cookie", &header)],
        b"",
    )
    .await;
    (status, body)
}

#[tokio::test]
async fn a_login_link_opens_one_session_across_replicas_and_logout_ends_it_on_every_one() {
    let cluster = EtcdCluster::start(1);
    let (deployments, replicas) = console_replicas(&cluster);

    // Made on replica 0, opened on replica 1; replica 0 then refuses it.
    let link = login_link(&replicas[0]).await;
    let (status, cookie, _) = open(&replicas[1], &link).await;
    assert_eq!(status, 200);
    let cookie = cookie.expect("a session cookie");
    let (status, _, body) = open(&replicas[0], &link).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("used already"), "{body}");

    // Both replicas asked at once with a fresh link: one session, one refusal.
    let link = login_link(&replicas[1]).await;
    let (first, second) = tokio::join!(open(&replicas[0], &link), open(&replicas[1], &link));
    let mut statuses = [first.0, second.0];
    statuses.sort();
    assert_eq!(
        statuses,
        [200, 401],
        "exactly one replica opens the session"
    );

    // The session from replica 1 works on replica 0 ...
    let (status, grants) = page(&replicas[0], &cookie, "/grants").await;
    assert_eq!(status, 200, "{grants}");
    let csrf = grants
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("the page's forms carry the CSRF token")
        .to_string();
    let header = format!("valet_console={cookie}");
    // A revoke-all without its typed confirmation is refused by the service, on the record.
    let form = format!("csrf={csrf}&target=environment&name=staging&reason=drill&confirm=revoke");
    let (status, _, body) = raw_exchange(
        replicas[0].console.as_deref().unwrap(),
        "POST",
        "/revoke-all",
        &[
            ("cookie", &header),
            ("content-type", "application/x-www-form-urlencoded"),
        ],
        form.as_bytes(),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("type `revoke all` to confirm"), "{body}");
    assert!(
        deployments[0].audit_records().iter().any(|record| {
            record["action"] == "token.revoke"
                && record["via"] == "revoke_all"
                && record["outcome"] == "denied"
                && record["principal"] == "operator"
                && record["reason"]
                    .as_str()
                    .is_some_and(|reason| reason.contains("type `revoke all` to confirm"))
        }),
        "the refusal is recorded"
    );
    // ... and logging out on replica 0 ends it on replica 1.
    let form = format!("csrf={csrf}");
    let (status, _, body) = raw_exchange(
        replicas[0].console.as_deref().unwrap(),
        "POST",
        "/logout",
        &[
            ("cookie", &header),
            ("content-type", "application/x-www-form-urlencoded"),
        ],
        form.as_bytes(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = page(&replicas[1], &cookie, "/approvals").await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("logged out"), "{body}");
}

#[tokio::test]
async fn without_console_listen_a_login_link_is_refused_with_what_to_set() {
    let deployment = Deployment::new(&standard_config(""));
    let valetd = deployment.start(&[]);
    assert!(valetd.console.is_none());
    let refused = valetd
        .client(OPERATOR_KEY)
        .await
        .admin()
        .create_console_login(v1::CreateConsoleLoginRequest {})
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused.message().contains("console_listen"),
        "{}",
        refused.message()
    );
}

/// A deployment on the embedded store with the console on, and its config text.
fn console_deployment(extra_server: &str) -> (Deployment, String) {
    let config = standard_config("").replacen(
        "grant_retention = \"1h\"\n",
        &format!("grant_retention = \"1h\"\nconsole_listen = \"127.0.0.1:0\"\n{extra_server}"),
        1,
    );
    (Deployment::new(&config), config)
}

/// Runs `valet` as the operator against `valetd` with `environment` added.
fn valet_cli(
    valetd: &Valetd,
    arguments: &[&str],
    environment: &[(&str, &str)],
) -> (bool, String, String) {
    let output = std::process::Command::new(binary("valet"))
        .args(arguments)
        .env("VALET_SERVER", &valetd.address)
        .env("VALET_KEY", OPERATOR_KEY)
        .envs(environment.iter().copied())
        .output()
        .expect("run valet");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The processes whose command line contains `needle`: pid and command line, as any local user
/// reads them from /proc.
fn processes_showing(needle: &str) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(bytes) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let line = String::from_utf8_lossy(&bytes).replace('\0', " ");
        if line.contains(needle) {
            found.push((pid, line));
        }
    }
    found
}

#[tokio::test]
async fn a_login_link_seen_in_the_process_list_opens_nothing_without_the_code_shown_to_the_cli() {
    let (deployment, _) = console_deployment("");
    let valetd = deployment.start(&[]);
    let console = valetd.console.clone().expect("the console listens");
    // A browser stays in the process list with the link as its argument, as real ones do.
    let browser = deployment.path("browser.sh");
    std::fs::write(
        &browser,
        "#!/bin/sh\npython3 -c 'import time; time.sleep(60)' \"$1\" &\nexit 0\n",
    )
    .unwrap();
    std::fs::set_permissions(
        &browser,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let (ok, _, stderr) = valet_cli(
        &valetd,
        &["console"],
        &[("BROWSER", browser.to_str().unwrap())],
    );
    assert!(ok, "{stderr}");
    let code = stderr
        .split("type this code on its login page: ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("valet console shows the code on its terminal")
        .to_string();

    // Another local user (nobody) reads the link from the browser's command line.
    let needle = format!("http://{console}/login?link=");
    // The browser was started in the background: it shows up once it has been exec'd.
    let mut shown = None;
    for _ in 0..100 {
        shown = processes_showing(&needle).into_iter().next();
        if shown.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (pid, _) = shown.expect("the browser process shows the link");
    let seen = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "cat"])
        .arg(format!("/proc/{pid}/cmdline"))
        .output()
        .expect("run setpriv (util-linux) to read the process list as nobody");
    let seen = String::from_utf8_lossy(&seen.stdout).replace('\0', " ");
    assert!(
        !seen.contains(&code),
        "the code is in no process's arguments"
    );
    let link = seen
        .split("/login?link=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("nobody reads the link")
        .to_string();
    let _ = std::process::Command::new("kill")
        .arg(pid.to_string())
        .status();

    // The bystander gets in neither without a code nor with a guess, each refusal recorded.
    for guess in ["", "AAAA-AAAA"] {
        let (status, cookie, body) = open(&valetd, &(link.clone(), guess.to_string())).await;
        assert_eq!(status, 401, "{body}");
        assert!(cookie.is_none());
        assert!(body.contains("code does not match"), "{body}");
    }
    // The operator, with the code from the terminal, opens the session.
    let (status, cookie, body) = open(&valetd, &(link, code)).await;
    assert_eq!(status, 200, "{body}");
    assert!(cookie.is_some());
    let records = deployment.audit_records();
    let refused = records
        .iter()
        .filter(|record| record["action"] == "console.login" && record["outcome"] == "denied")
        .count();
    assert_eq!(refused, 2, "both wrong codes are recorded");
}

#[tokio::test]
async fn however_many_codes_arrive_at_once_a_link_compares_five() {
    let (deployment, _) = console_deployment("");
    let valetd = deployment.start(&[]);
    let (link, code) = login_link(&valetd).await;
    // Forty wrong codes at once, then the right one: at most five codes are ever compared, so
    // the right one comes too late.
    let guesses: Vec<(String, String)> = (0..40)
        .map(|n| (link.clone(), format!("WRNG-{n:04}")))
        .collect();
    let wrong: Vec<_> = guesses.iter().map(|guess| open(&valetd, guess)).collect();
    let answers = futures::future::join_all(wrong).await;
    assert!(
        answers
            .iter()
            .all(|(status, cookie, _)| *status == 401 && cookie.is_none())
    );
    let compared = answers
        .iter()
        .filter(|(_, _, body)| body.contains("code does not match"))
        .count();
    assert_eq!(
        compared, 5,
        "five codes were compared; the rest found the link used up"
    );
    let (status, cookie, body) = open(&valetd, &(link, code)).await;
    assert_eq!(status, 401, "{body}");
    assert!(cookie.is_none());
    assert!(body.contains("used up"), "{body}");
}

#[tokio::test]
async fn a_rotated_operator_key_ends_the_sessions_it_opened_and_operators_list_and_end_sessions() {
    let (deployment, config) = console_deployment("");
    let valetd = deployment.start(&[]);
    let first = open(&valetd, &login_link(&valetd).await).await;
    let second = open(&valetd, &login_link(&valetd).await).await;
    let (first, second) = (first.1.expect("a session"), second.1.expect("a session"));

    // `valet console sessions` lists both, with the credential that opened them.
    let (ok, listed, stderr) = valet_cli(&valetd, &["console", "sessions", "--json"], &[]);
    assert!(ok, "{stderr}");
    let listed: serde_json::Value = serde_json::from_str(listed.trim()).expect("JSON");
    let sessions = listed.as_array().expect("an array");
    assert_eq!(sessions.len(), 2, "{listed}");
    assert!(
        sessions.iter().all(|session| session["credential"]
            .as_str()
            .unwrap()
            .starts_with("principal key ")),
        "{listed}"
    );
    // An operator ends one; it is refused from then on, the other is not.
    let id = sessions[0]["id"].as_str().unwrap().to_string();
    let (ok, _, stderr) = valet_cli(&valetd, &["console", "end", &id], &[]);
    assert!(ok, "{stderr}");
    let statuses = [
        page(&valetd, &first, "/approvals").await.0,
        page(&valetd, &second, "/approvals").await.0,
    ];
    assert!(
        statuses.contains(&401) && statuses.contains(&200),
        "{statuses:?}"
    );
    let survivor = if statuses[0] == 200 { &first } else { &second };
    let (status, sessions_page) = page(&valetd, survivor, "/sessions").await;
    assert_eq!(status, 200, "{sessions_page}");
    assert!(sessions_page.contains("principal key "), "{sessions_page}");

    // The operator key is rotated (config change, reload): the session it opened ends at its
    // next request, on the pages and the live event stream alike.
    let rotated = config.replace(
        &valet_tests::sha256_hex(OPERATOR_KEY),
        &valet_tests::sha256_hex("vk_test_operator_rotated_77"),
    );
    std::fs::write(deployment.config_path(), rotated).unwrap();
    valetd
        .client(valet_tests::ADMIN_KEY)
        .await
        .admin()
        .reload_config(v1::ReloadConfigRequest {})
        .await
        .expect("the reload applies");
    let (status, body) = page(&valetd, survivor, "/grants").await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("no longer accepted"), "{body}");
    assert!(body.contains("key was replaced"), "{body}");
    let ended = deployment
        .audit_records()
        .into_iter()
        .filter(|record| record["action"] == "console.session_end")
        .map(|record| record["reason"].as_str().unwrap_or_default().to_string())
        .collect::<Vec<_>>();
    assert_eq!(ended.len(), 2, "{ended:?}");
    assert!(ended.iter().any(|reason| reason.contains("by an operator")));
    assert!(
        ended
            .iter()
            .any(|reason| reason.contains("key was replaced"))
    );
}

#[tokio::test]
async fn behind_a_tls_terminating_proxy_the_session_cookie_is_secure_and_hsts_is_sent() {
    use valet_tests::pki::{Ca, Validity};
    let ca = Ca::new("proxy CA");
    let files = tempfile::tempdir().unwrap();
    let (certificate, key) =
        ca.server_certificate(&["127.0.0.1"], Validity::Current, files.path(), "proxy");
    let ca_file = files.path().join("ca.crt");
    ca.write_certificate(&ca_file);
    // The console serves plaintext on loopback; browsers reach it through nginx over https.
    let (console_port, proxy_port) = (valet_tests::ports::reserve(), valet_tests::ports::reserve());
    let config = standard_config("").replacen(
        "grant_retention = \"1h\"\n",
        &format!(
            "grant_retention = \"1h\"\nconsole_listen = \"127.0.0.1:{console_port}\"\nconsole_url = \"https://127.0.0.1:{proxy_port}\"\n"
        ),
        1,
    );
    let deployment = Deployment::new(&config);
    let valetd = deployment.start(&[]);
    let proxy = valet_tests::nginx::TlsProxy::start(
        proxy_port,
        &format!("127.0.0.1:{console_port}"),
        &certificate,
        &key,
    );
    let login = valetd
        .client(OPERATOR_KEY)
        .await
        .admin()
        .create_console_login(v1::CreateConsoleLoginRequest {})
        .await
        .expect("a login link")
        .into_inner();
    assert!(
        login
            .url
            .starts_with(&format!("https://{}/login?link=", proxy.address)),
        "{}",
        login.url
    );
    let link = login.url.split_once("link=").unwrap().1.to_string();
    let curl = |arguments: &[&str]| {
        let output = std::process::Command::new("curl")
            .args(["--silent", "--show-error", "--max-time", "20", "--include"])
            .arg("--cacert")
            .arg(&ca_file)
            .args(arguments)
            .output()
            .expect("run curl");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let header = |answer: &str, name: &str| -> Option<String> {
        answer.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name)
                .then(|| value.trim().to_string())
        })
    };
    let answer = curl(&[
        "--data",
        &format!("link={link}&code={}", login.code),
        &format!("https://{}/login", proxy.address),
    ]);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let cookie = header(&answer, "set-cookie").expect("a session cookie");
    assert!(cookie.starts_with("__Host-valet_console="), "{cookie}");
    assert!(cookie.contains("; Secure"), "{cookie}");
    assert!(cookie.contains("Path=/"), "{cookie}");
    assert_eq!(
        header(&answer, "strict-transport-security").as_deref(),
        Some("max-age=31536000")
    );
    // The cookie opens the pages through the proxy, each with HSTS.
    let pair = cookie.split(';').next().unwrap().to_string();
    let page = curl(&[
        "--cookie",
        &pair,
        &format!("https://{}/grants", proxy.address),
    ]);
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(header(&page, "strict-transport-security").is_some());
    drop(valetd);
}

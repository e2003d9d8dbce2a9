//! The web console across replicas: two valetd on one etcd cluster, a login link made on one and
//! opened on the other, once, whichever replica is asked and even when both are asked at once;
//! a session opened on one replica works on the other, and logging out on one ends it on both.
//! (The browser tests in tests/console drive the pages themselves.)

use valet_client::v1;
use valet_tests::etcd::EtcdCluster;
use valet_tests::upstream::raw_exchange;
use valet_tests::{Deployment, OPERATOR_KEY, Valetd, standard_config};

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

/// A login link's pass, made by `valetd` for the operator.
async fn login_link(valetd: &Valetd) -> String {
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
    link.to_string()
}

/// POST /login on `valetd`'s console: the status, and the session cookie when one was set.
async fn open(valetd: &Valetd, link: &str) -> (u16, Option<String>, String) {
    let console = valetd.console.as_deref().unwrap();
    let form = format!("link={link}");
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
    let (_deployments, replicas) = console_replicas(&cluster);

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
    // ... and logging out on replica 0 ends it on replica 1.
    let header = format!("valet_console={cookie}");
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

//! The README's tour, against the example config as it ships (`deploy/examples/valet.toml`, only
//! its ports made free) and the demo API it fronts (`deploy/examples/demo-api.py`, whose own
//! output says what it executed): an allowed gateway call, refused ones, a destructive call that
//! waits for a person and runs once approved, and the panic button ending the agent's access.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use valet_tests::upstream::call;
use valet_tests::{Deployment, binary, eventually};

fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The demo API, as the tour starts it (on a free port); stopped when dropped.
struct DemoApi {
    child: Child,
    port: u16,
    /// Every line it printed: `executed: …` for each call it ran.
    lines: Arc<Mutex<Vec<String>>>,
}

impl DemoApi {
    fn start() -> DemoApi {
        let mut child = Command::new("python3")
            .arg(repository().join("deploy/examples/demo-api.py"))
            .args(["--port", "0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the demo API (python3 is needed)");
        let stdout = child.stdout.take().expect("piped stdout");
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let (sender, receiver) = std::sync::mpsc::channel();
        let kept = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(address) = line.strip_prefix("demo API listening on 127.0.0.1:") {
                    let _ = sender.send(address.trim().parse::<u16>().ok());
                }
                kept.lock().unwrap().push(line);
            }
        });
        let port = receiver
            .recv_timeout(Duration::from_secs(30))
            .ok()
            .flatten()
            .expect("the demo API says where it listens within 30 s");
        DemoApi { child, port, lines }
    }

    fn executed(&self) -> Vec<String> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|line| line.starts_with("executed: "))
            .cloned()
            .collect()
    }
}

impl Drop for DemoApi {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `valet` with `key`, against `server`: (exit code, stdout, stderr).
fn valet(server: &str, key: &str, arguments: &[&str]) -> (i32, String, String) {
    let output = Command::new(binary("valet"))
        .args(arguments)
        .env("VALET_SERVER", server)
        .env("VALET_KEY", key)
        .output()
        .expect("run valet");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn the_readme_tour_runs_against_the_example_config_and_the_demo_api() {
    let demo = DemoApi::start();
    let examples = repository().join("deploy/examples");
    let config = std::fs::read_to_string(examples.join("valet.toml"))
        .unwrap()
        .replace("127.0.0.1:7470", "127.0.0.1:0")
        .replace("127.0.0.1:7471", "127.0.0.1:0")
        .replace("127.0.0.1:7473", "127.0.0.1:0")
        .replace("127.0.0.1:7472", &format!("127.0.0.1:{}", demo.port));
    // The example as it ships, with its demo keys and credentials, in a directory of its own.
    let deployment = Deployment::new(&config);
    for directory in ["demo-keys", "demo-secrets"] {
        std::fs::create_dir_all(deployment.path(directory)).unwrap();
        for entry in std::fs::read_dir(examples.join(directory)).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(
                entry.path(),
                deployment.path(directory).join(entry.file_name()),
            )
            .unwrap();
        }
    }
    let key = |name: &str| {
        std::fs::read_to_string(examples.join("demo-keys").join(format!("{name}.key")))
            .unwrap()
            .trim()
            .to_string()
    };
    let (agent, operator) = (key("agent"), key("operator"));
    let valetd = deployment.start(&["--dev"]);
    let (server, gateway) = (valetd.address.clone(), valetd.gateway.clone().unwrap());

    // A token for one task on one project.
    let (code, token, stderr) = valet(
        &server,
        &agent,
        &[
            "token",
            "request",
            "--scope",
            "demo-staging",
            "--task",
            "tidy-volumes",
            "--param",
            "project=shop",
            "--purpose",
            "drop the cache volume",
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    let token = token.trim();

    // Allowed: the project's volumes.
    let listed = call(
        &gateway,
        "GET",
        "/u/demo/projects/shop/volumes",
        token,
        "",
        &[],
    )
    .await;
    assert_eq!(listed.status, 200, "{}", listed.body);
    assert_eq!(listed.json(), serde_json::json!(["shop-db", "shop-cache"]));

    // Refused: no rule deletes a project; another project is not the grant's.
    let refused = call(&gateway, "DELETE", "/u/demo/projects/shop", token, "", &[]).await;
    assert_eq!(refused.status, 403, "{}", refused.body);
    assert!(
        refused.json()["reason"]
            .as_str()
            .unwrap()
            .contains("no rule of scope \"demo-staging\" allows DELETE /projects/shop"),
        "{}",
        refused.body
    );
    let other = call(
        &gateway,
        "GET",
        "/u/demo/projects/prod-db/volumes",
        token,
        "",
        &[],
    )
    .await;
    assert_eq!(other.status, 403, "{}", other.body);

    // A volume's deletion waits for a person.
    let target = "/u/demo/projects/shop/volumes/shop-cache";
    let waiting = call(&gateway, "DELETE", target, token, "", &[]).await;
    assert_eq!(waiting.status, 428, "{}", waiting.body);
    let approval_id = waiting.json()["approval_id"].as_str().unwrap().to_string();
    assert!(
        demo.executed().iter().all(|line| !line.contains("DELETE")),
        "nothing destructive ran before the approval: {:?}",
        demo.executed()
    );
    let (code, _, stderr) = valet(
        &server,
        &operator,
        &[
            "approve",
            &approval_id,
            "--confirm",
            "staging",
            "--reason",
            "cache only",
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    let approval = [("valet-approval", approval_id.as_str())];
    let deleted = call(&gateway, "DELETE", target, token, "", &approval).await;
    assert_eq!(deleted.status, 200, "{}", deleted.body);
    // Once: the same approval releases nothing more.
    let again = call(&gateway, "DELETE", target, token, "", &approval).await;
    assert_eq!(again.status, 403, "{}", again.body);

    // The panic button: the agent's access ends on its next call.
    let (code, _, stderr) = valet(
        &server,
        &operator,
        &[
            "revoke-all",
            "--environment",
            "staging",
            "--reason",
            "incident 17",
            "--yes",
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    let after = call(
        &gateway,
        "GET",
        "/u/demo/projects/shop/volumes",
        token,
        "",
        &[],
    )
    .await;
    assert_eq!(after.status, 401, "{}", after.body);

    // What the demo API itself says it executed: the listing, and the one approved deletion.
    assert!(
        eventually(Duration::from_secs(5), || async {
            demo.executed().len() >= 2
        })
        .await
    );
    let executed = demo.executed();
    assert_eq!(executed.len(), 2, "{executed:?}");
    assert!(
        executed[0].contains("listed the volumes of shop"),
        "{executed:?}"
    );
    assert!(
        executed[1].contains("DELETED volume shop-cache of shop"),
        "{executed:?}"
    );
}

//! The client scenarios both clients must pass (`clients/scenarios.md`): every Rust test the table
//! names exists in this suite as a test, so the list cannot drift from it (the Python suite checks
//! its own column the same way).

use std::path::PathBuf;

#[test]
fn every_shared_client_scenario_has_a_rust_test() {
    let repository = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let table = std::fs::read_to_string(repository.join("clients/scenarios.md")).unwrap();
    let rows: Vec<Vec<&str>> = table
        .lines()
        .filter(|line| {
            line.starts_with("| ") && !line.starts_with("| scenario") && !line.contains("---")
        })
        .map(|line| line.split('|').map(str::trim).collect())
        .collect();
    assert!(rows.len() >= 10, "the table lists the scenarios: {table}");
    let mut missing = Vec::new();
    for row in &rows {
        let (scenario, rust) = (row[1], row[2]);
        let Some((module, name)) = rust.split_once("::") else {
            missing.push(format!("{scenario}: {rust:?} is not module::test"));
            continue;
        };
        let source = std::fs::read_to_string(repository.join(format!("tests/e2e/{module}.rs")))
            .unwrap_or_default();
        let declared = source.split("#[tokio::test]").skip(1).any(|after| {
            after
                .trim_start()
                .starts_with(&format!("async fn {name}()"))
        });
        if !declared {
            missing.push(format!("{scenario}: no test {rust} in tests/e2e"));
        }
    }
    assert!(missing.is_empty(), "{missing:#?}");
}

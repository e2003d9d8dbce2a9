//! The benchmark tool cleans up after itself: every process a run starts (valetd, the baseline
//! servers, nginx with its workers, the MCP server) is stopped and reaped when the run ends.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use valet_tests::binary;

/// The processes (pid and command line) whose working directory is `directory`.
fn processes_in(directory: &std::path::Path) -> Vec<(String, String)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let pid = entry.file_name().to_string_lossy().to_string();
        if !pid.bytes().all(|byte| byte.is_ascii_digit()) {
            continue;
        }
        if std::fs::read_link(entry.path().join("cwd")).ok().as_deref() == Some(directory) {
            let command = std::fs::read(entry.path().join("cmdline"))
                .map(|bytes| String::from_utf8_lossy(&bytes).replace('\0', " "))
                .unwrap_or_default();
            found.push((pid, command));
        }
    }
    found
}

#[test]
fn a_benchmark_run_leaves_no_process_behind() {
    let directory = tempfile::tempdir().unwrap();
    let directory = directory.path().canonicalize().unwrap();
    let log = std::fs::File::create(directory.join("bench.log")).unwrap();
    // Output to a file, not a pipe: a process left holding the pipe would hang the test instead of
    // failing it.
    let mut run = Command::new(binary("valet-bench"))
        .current_dir(&directory)
        .args(["gateway", "--smoke"])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(180);
    let status = loop {
        if let Some(status) = run.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "valet-bench gateway --smoke ran over 180 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let printed = std::fs::read_to_string(directory.join("bench.log")).unwrap();
    assert!(status.success(), "valet-bench failed:\n{printed}");
    assert!(
        printed.contains("vs nginx"),
        "the run measured nginx:\n{printed}"
    );
    // Give the kernel a moment to finish tearing down what was killed.
    let mut left = processes_in(&directory);
    for _ in 0..20 {
        if left.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        left = processes_in(&directory);
    }
    assert!(left.is_empty(), "processes outlived the run: {left:?}");
}

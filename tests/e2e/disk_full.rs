//! A full data disk: valetd fails closed while it cannot write durably, and once space is freed
//! it issues and revokes again without a restart. The test mounts a small tmpfs (the test
//! command runs as root) for the store and the audit log, and fills it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use valet_client::TokenRequest;
use valet_tests::{AGENT_KEY, Deployment, eventually, standard_config};

/// A tmpfs of `megabytes`, unmounted when dropped.
struct SmallDisk {
    path: PathBuf,
    _directory: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(megabytes: u32) -> SmallDisk {
        let directory = tempfile::tempdir().expect("a temp dir");
        let path = directory.path().join("disk");
        std::fs::create_dir(&path).expect("a mount point");
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={megabytes}m"), "tmpfs"])
            .arg(&path)
            .output()
            .expect("run mount");
        assert!(
            output.status.success(),
            "mounting a small tmpfs failed (the test command runs as root, which this test needs): {}",
            String::from_utf8_lossy(&output.stderr)
        );
        SmallDisk {
            path,
            _directory: directory,
        }
    }

    /// Writes a file until the disk is full; returns its path.
    fn fill(&self) -> PathBuf {
        let filler = self.path.join("filler");
        let mut file = std::fs::File::create(&filler).expect("create the filler");
        let chunk = vec![0u8; 64 * 1024];
        while file.write_all(&chunk).is_ok() {}
        // The last partial chunk may have fit byte by byte.
        while file.write_all(&[0]).is_ok() {}
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

fn path_text(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 path")
}

#[tokio::test]
async fn after_the_disk_fills_valetd_fails_closed_and_recovers_without_a_restart() {
    let disk = SmallDisk::mount(24);
    let data = disk.path.join("data");
    let audit = disk.path.join("audit/audit.jsonl");
    let config = standard_config("")
        .replace(
            "data_dir = \"data\"",
            &format!("data_dir = \"{}\"", path_text(&data)),
        )
        .replace(
            "path = \"audit/audit.jsonl\"",
            &format!("path = \"{}\"", path_text(&audit)),
        );
    let deployment = Deployment::new(&config);
    let valetd = deployment.start(&[]);
    let agent = valetd.client(AGENT_KEY).await;
    let before = agent
        .request_token(TokenRequest::new("limited", "before-full"))
        .await
        .expect("a token while there is space");

    let filler = disk.fill();
    let mut refused = None;
    for index in 0..50 {
        match agent
            .request_token(TokenRequest::new("limited", format!("while-full-{index}")))
            .await
        {
            Ok(_) => continue,
            Err(error) => {
                refused = Some(error);
                break;
            }
        }
    }
    let refused = refused.expect("with the disk full, valetd refuses to issue");
    assert_eq!(refused.code(), Some(tonic::Code::Unavailable), "{refused}");
    assert!(refused.to_string().contains("fail closed"), "{refused}");

    std::fs::remove_file(&filler).expect("free the space");
    let recovered = eventually(Duration::from_secs(20), || async {
        agent
            .request_token(TokenRequest::new("limited", "after-free"))
            .await
            .is_ok()
    })
    .await;
    assert!(
        recovered,
        "valetd issues again once space is freed, without a restart; it printed:\n{}",
        &valetd.output()[valetd.output().len().saturating_sub(3000)..]
    );
    agent
        .revoke(&before.grant.id, "after the disk was freed")
        .await
        .expect("and revokes");
    // The grant issued before the disk filled survived, and the audit chain verifies.
    drop(agent);
    valetd.stop().await;
    let verify = Command::new(valet_tests::binary("valet"))
        .args(["audit", "verify"])
        .arg(&audit)
        .args(["--seal-key-file"])
        .arg(deployment.path("seal.key"))
        .output()
        .expect("run valet audit verify");
    assert!(
        verify.status.success(),
        "the audit log verifies after the outage: {}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
}

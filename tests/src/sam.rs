//! `sam build`, shared by the tests that need its output (binaries.rs checks it, sam_local.rs
//! runs it), so that one `make test` builds it at most once.

use std::path::Path;
use std::time::SystemTime;

use crate::{newest, repo_root};

/// Runs `sam build` unless `.aws-sam/build` is newer than every source it is built from
/// (template.yaml, the workspace manifests, the lock file, functions/). Each of its callers is
/// one test in its own test binary, and `cargo test` runs test binaries one after the other,
/// so two builds never overlap.
pub fn ensure_sam_build() -> Result<(), String> {
    let root = repo_root();
    if sam_build_is_fresh(&root) {
        return Ok(());
    }
    let venv = root.join(".venv/bin");
    let out = std::process::Command::new(venv.join("sam"))
        .arg("build")
        .current_dir(&root)
        .env(
            "PATH",
            format!(
                "{}:{}",
                venv.display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .env("SAM_CLI_TELEMETRY", "0")
        .output()
        .map_err(|e| format!("run sam build: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "sam build failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// Whether `.aws-sam/build/template.yaml` (written last by `sam build`) is newer than every
/// source of the build.
pub fn sam_build_is_fresh(root: &Path) -> bool {
    let mtime = |p: &Path| {
        std::fs::metadata(p)
            .and_then(|m| m.modified())
            .unwrap_or(SystemTime::UNIX_EPOCH)
    };
    let built = root.join(".aws-sam/build/template.yaml");
    if !built.exists() {
        return false;
    }
    let sources = ["template.yaml", "Cargo.toml", "Cargo.lock"]
        .iter()
        .map(|f| mtime(&root.join(f)))
        .chain([newest(&root.join("functions"))])
        .max()
        .unwrap_or(SystemTime::UNIX_EPOCH);
    mtime(&built) >= sources
}

//! Debian tools the tests need (`promtool`, `chromium`, `lintian`, ...), installed with
//! `apt-get` when missing, and `promtool check metrics`.
//!
//! Only `std`: the agent's and discovery's unit tests include this file too (`#[path]`), so
//! every test checks metrics with the same real parser, installed the same way.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Mutex;

/// `program` on `PATH`, after installing Debian's `package` when it is missing. The error
/// says why it could not be installed: the test then fails, it never skips.
pub fn ensure_tool(program: &str, package: &str) -> Result<PathBuf, String> {
    // Tests run on threads: one apt-get at a time (dpkg takes a lock).
    static INSTALL: Mutex<()> = Mutex::new(());
    let _one = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(found) = on_path(program) {
        return Ok(found);
    }
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends", package])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
    };
    let mut out = install().map_err(|e| format!("running apt-get (is this Debian?): {e}"))?;
    if !out.status.success() {
        // A fresh machine may have no package lists yet.
        let _ = Command::new("apt-get").arg("update").output();
        out = install().map_err(|e| format!("running apt-get: {e}"))?;
    }
    match on_path(program) {
        Some(found) if out.status.success() => Ok(found),
        _ => Err(format!(
            "this test needs {program} from Debian's {package} package, and \
             `apt-get install -y {package}` failed (no network, or not root?): {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )),
    }
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

/// What `promtool check metrics` (a real Prometheus parser and linter) says about `text`: its
/// exit code (0: valid and clean, 3: valid with lint findings, 1: not parseable) and its
/// stdout and stderr. Installs Debian's `prometheus` package when promtool is missing; panics
/// (fails the test) when that, or running it, is impossible.
pub fn promtool_check(text: &str) -> (i32, String) {
    let promtool = ensure_tool("promtool", "prometheus").unwrap_or_else(|e| panic!("{e}"));
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running promtool: {e}"));
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(text.as_bytes())
            .unwrap_or_else(|e| panic!("writing to promtool: {e}"));
    }
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("waiting for promtool: {e}"));
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), said)
}

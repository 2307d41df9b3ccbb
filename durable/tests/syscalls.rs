//! What `write_atomic` asks of the kernel, seen with strace: the temporary file is created
//! with its final mode and set to exactly that mode, written and fsynced before the rename,
//! and the directory is fsynced after it. The order is the whole point of the helper and
//! nothing but the system calls shows it.
//!
//! The test runs this same test binary again under `strace -f` with umask 077, so that
//! `child_writes_under_strace` does the writes. Debian's strace is installed when missing; the
//! test is skipped (with a note) only where ptrace is not allowed.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use pilotfish_durable::{write_atomic, PUBLIC_MODE, SECRET_MODE};

const CHILD_DIR: &str = "PILOTFISH_DURABLE_CHILD_DIR";

/// Runs only inside the strace'd child (the variable names its directory).
#[test]
fn child_writes_under_strace() {
    let Some(dir) = std::env::var_os(CHILD_DIR) else {
        return;
    };
    let dir = Path::new(&dir);
    write_atomic(&dir.join("secret"), b"S3CRET", SECRET_MODE).unwrap();
    write_atomic(&dir.join("public"), b"PUBLIC", PUBLIC_MODE).unwrap();
    // umask 077 would have made the public file 0600 without the fchmod.
    for (name, want) in [("secret", 0o600), ("public", 0o644)] {
        let mode = fs::metadata(dir.join(name)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, want, "{name}");
    }
}

#[test]
fn writes_fsyncs_renames_then_fsyncs_the_directory() {
    // Debian's strace, installed here when missing (as root, like the other tests' tools).
    if Command::new("strace").arg("-V").output().is_err() {
        let _ = Command::new("apt-get")
            .args(["install", "-y", "-q", "strace"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status();
    }
    assert!(
        Command::new("strace").arg("-V").output().is_ok(),
        "strace is needed: apt-get install -y strace"
    );
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    fs::create_dir(&work).unwrap();
    let trace = dir.path().join("trace");
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("sh")
        .arg("-c")
        .arg(r#"umask 077 && exec strace -f -qq -o "$0" -e trace=openat,fchmod,write,fsync,fdatasync,rename,renameat,renameat2 "$1" --exact child_writes_under_strace --test-threads=1"#)
        .arg(&trace)
        .arg(&exe)
        .env(CHILD_DIR, &work)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() && stderr.contains("ptrace") {
        eprintln!("SKIPPED: strace cannot trace here: {stderr}");
        return;
    }
    assert!(
        out.status.success(),
        "child failed: {}\n{stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    let trace = fs::read_to_string(&trace).unwrap();
    let work = work.to_str().unwrap();
    check_sequence(&trace, work, "secret", "0600", "S3CRET");
    check_sequence(&trace, work, "public", "0644", "PUBLIC");
}

/// Finds, in order and on one thread, the system calls of one `write_atomic`.
fn check_sequence(trace: &str, dir: &str, name: &str, mode: &str, contents: &str) {
    let tmp_prefix = format!("\"{dir}/.{name}.");
    let lines: Vec<&str> = trace.lines().collect();
    let create = lines
        .iter()
        .position(|l| l.contains("openat(") && l.contains(&tmp_prefix))
        .unwrap_or_else(|| panic!("no temporary file created for {name}:\n{trace}"));
    let open = lines[create];
    assert!(
        open.contains("O_CREAT|O_EXCL") && open.contains(&format!(", {mode})")),
        "the temporary is created exclusively with mode {mode}: {open}"
    );
    let pid = open.split_whitespace().next().unwrap();
    let fd = result_of(open);
    let rest: Vec<&str> = lines[create + 1..]
        .iter()
        .copied()
        .filter(|l| l.split_whitespace().next() == Some(pid))
        .collect();
    let find = |from: usize, what: &dyn Fn(&str) -> bool, label: &str| -> usize {
        rest[from..]
            .iter()
            .position(|l| what(l))
            .map(|i| from + i)
            .unwrap_or_else(|| panic!("{name}: no {label} after step {from}:\n{}", rest.join("\n")))
    };
    let chmod = find(
        0,
        &|l| l.contains(&format!("fchmod({fd}, {mode})")),
        "fchmod",
    );
    let write = find(
        chmod,
        &|l| l.contains(&format!("write({fd}, \"{contents}\"")),
        "write",
    );
    let fsync = find(
        write,
        &|l| l.contains(&format!("fsync({fd})")),
        "fsync of the file",
    );
    let target = format!("\"{dir}/{name}\"");
    let rename = find(
        fsync,
        &|l| l.contains("rename") && l.contains(&tmp_prefix) && l.contains(&target),
        "rename",
    );
    assert!(
        rest[..rename].iter().all(|l| !l.contains("rename")),
        "{name}: renamed before the fsync"
    );
    let open_dir = find(
        rename,
        &|l| l.contains("openat(") && l.contains(&format!("\"{dir}\"")),
        "open of the directory",
    );
    let dir_fd = result_of(rest[open_dir]);
    find(
        open_dir,
        &|l| l.contains(&format!("fsync({dir_fd})")),
        "fsync of the directory",
    );
}

/// The return value of a traced call: `... = 3`.
fn result_of(line: &str) -> &str {
    line.rsplit("= ")
        .next()
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
}

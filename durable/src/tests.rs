use std::os::unix::fs::PermissionsExt;

use super::*;

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

#[test]
fn replaces_whole_files_with_the_mode_and_leaves_no_temporary_behind() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a.toml");
    write_atomic(&file, b"one", SECRET_MODE).unwrap();
    assert_eq!(mode(&file), 0o600);
    write_atomic(&file, b"two", PUBLIC_MODE).unwrap();
    assert_eq!(fs::read_to_string(&file).unwrap(), "two");
    // The mode is the one asked for, not the old file's.
    assert_eq!(mode(&file), 0o644);
    write_atomic(&file, b"three", SECRET_MODE).unwrap();
    assert_eq!(mode(&file), 0o600);
    assert_eq!(names(dir.path()), ["a.toml"]);
}

#[test]
fn a_bare_file_name_is_written_in_the_current_directory() {
    // Only checks the parent of a bare name resolves; no chdir in a multi-threaded test.
    assert_eq!(parent(Path::new("x")), Path::new("."));
    assert_eq!(parent(Path::new("/x")), Path::new("/"));
    assert_eq!(parent(Path::new("d/x")), Path::new("d"));
}

#[test]
fn a_failed_write_leaves_the_old_file_and_no_temporary() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a.toml");
    write_atomic(&file, b"one", SECRET_MODE).unwrap();
    // The target is a non-empty directory: the rename fails after the temporary was written.
    let target = dir.path().join("sub");
    fs::create_dir(&target).unwrap();
    fs::write(target.join("x"), "x").unwrap();
    assert!(write_atomic(&target, b"two", SECRET_MODE).is_err());
    assert_eq!(fs::read_to_string(&file).unwrap(), "one");
    assert_eq!(names(dir.path()), ["a.toml", "sub"]);
    assert_eq!(names(&target), ["x"]);
    // A missing directory fails before anything is created.
    let err = write_atomic(&dir.path().join("no/such"), b"x", SECRET_MODE).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::NotFound);
    // So does a path with no file name.
    assert!(write_atomic(Path::new("/"), b"x", SECRET_MODE).is_err());
}

#[test]
fn temporary_names_are_unique_dot_files_next_to_the_target() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("cache.bin");
    let (a, _) = create_temp(dir.path(), &target, SECRET_MODE).unwrap();
    let (b, _) = create_temp(dir.path(), &target, SECRET_MODE).unwrap();
    assert_ne!(a, b);
    for tmp in [&a, &b] {
        assert_eq!(tmp.parent(), Some(dir.path()));
        let name = tmp.file_name().unwrap().to_str().unwrap();
        assert!(
            name.starts_with(".cache.bin.") && name.ends_with(".tmp"),
            "{name}"
        );
        assert_eq!(mode(tmp), 0o600);
    }
}

#[test]
fn rename_moves_across_directories_and_remove_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let next = dir.path().join("next");
    create_dir_all(&next, 0o700).unwrap();
    write_atomic(&next.join("root.key"), b"k", SECRET_MODE).unwrap();
    rename(&next.join("root.key"), &dir.path().join("root.key")).unwrap();
    assert_eq!(fs::read(dir.path().join("root.key")).unwrap(), b"k");
    remove_dir(&next).unwrap();
    assert_eq!(names(dir.path()), ["root.key"]);
    assert!(rename(&next.join("root.key"), &dir.path().join("x")).is_err());

    remove(&dir.path().join("root.key")).unwrap();
    remove(&dir.path().join("root.key")).unwrap();
    assert!(names(dir.path()).is_empty());
}

#[test]
fn append_creates_the_log_with_the_mode_and_appends() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("issued.jsonl");
    append(&log, b"one\n", SECRET_MODE).unwrap();
    append(&log, b"two\n", PUBLIC_MODE).unwrap();
    assert_eq!(fs::read_to_string(&log).unwrap(), "one\ntwo\n");
    // An existing log keeps its mode.
    assert_eq!(mode(&log), 0o600);
}

#[test]
fn create_dir_all_makes_every_missing_level_and_accepts_existing_ones() {
    let dir = tempfile::tempdir().unwrap();
    let deep = dir.path().join("a/b/c");
    create_dir_all(&deep, 0o700).unwrap();
    for level in ["a", "a/b", "a/b/c"] {
        assert_eq!(mode(&dir.path().join(level)), 0o700, "{level}");
    }
    create_dir_all(&deep, 0o700).unwrap();
    create_dir_all(dir.path(), 0o700).unwrap();
    // A file in the way is an error.
    fs::write(dir.path().join("f"), "x").unwrap();
    assert!(create_dir_all(&dir.path().join("f/g"), 0o700).is_err());
}

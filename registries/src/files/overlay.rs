//! Checking a proposed change to the registry files before it is written: [`check_with`] is
//! [`super::load_once`] with some files' contents replaced or removed, so that a change made
//! through discovery's rules API is validated exactly like the same edit made on disk (same
//! parser, same checks across files, same `file:line:column` messages).
//!
//! [`declared`] lists the traffic-rule tables (`[routes.<svc>]`, `[policies.<svc>]`, ...) that
//! the files on disk hold as written, valid or not, so the API can tell which file owns an
//! object and show it as the operator wrote it.

use std::path::PathBuf;

use super::state::FileSet;
use super::{apply_scan, scan, Problem};
use crate::model::Catalog;

/// What [`super::load_once`] returns for `paths`, but as if each file in `overlay` had the
/// given content (`Some`) or did not exist (`None`). Overlay paths are normally under `paths`;
/// one that is not is checked as if `paths` named it. Unlike `load_once`, missing paths are
/// not logged: this runs on every API write.
pub fn check_with(
    paths: &[PathBuf],
    overlay: &[(PathBuf, Option<String>)],
) -> (Catalog, Vec<Problem>) {
    let mut scanned = scan::scan(paths);
    for (path, content) in overlay {
        match content {
            Some(text) => {
                scanned.files.insert(path.clone(), Ok(text.clone()));
            }
            None => {
                scanned.files.remove(path);
            }
        }
    }
    let mut set = FileSet::default();
    apply_scan(scanned, &mut set, true);
    set.settle();
    let (catalog, invariant) = set.catalog();
    let mut problems = set.problems();
    problems.extend(invariant);
    (catalog, problems)
}

/// One `[<kind>.<service>]` table as written in a file on disk.
#[derive(Debug, Clone, PartialEq)]
pub struct Declared {
    pub file: PathBuf,
    pub service: String,
    /// The table as TOML, not validated.
    pub table: toml::Value,
    /// The whole file's text (the table's version is derived from it).
    pub content: String,
}

/// Every `[<kind>.<service>]` table (`kind` is `routes`, `policies`, ...) in the files under
/// `paths`, in file order, whether or not the file is valid. Files that are not TOML at all
/// are skipped: they declare nothing anyone could read.
pub fn declared(paths: &[PathBuf], kind: &str) -> Vec<Declared> {
    let mut out = Vec::new();
    for (file, read) in scan::scan(paths).files {
        let Ok(content) = read else { continue };
        let Ok(doc) = toml::from_str::<toml::Table>(&content) else {
            continue;
        };
        let Some(toml::Value::Table(objects)) = doc.get(kind) else {
            continue;
        };
        for (service, table) in objects {
            out.push(Declared {
                file: file.clone(),
                service: service.clone(),
                table: table.clone(),
                content: content.clone(),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::files::load_once;

    const SERVICES: &str = r#"
[services.reviews]
port = 9080

[[services.reviews.instances]]
address = "10.0.0.12"
port = 9080
labels = { version = "v1" }
"#;

    const POLICY: &str = r#"
[policies.reviews]
subsets = { v1 = { version = "v1" }, v2 = { version = "v2" } }
"#;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write");
        path
    }

    fn messages(problems: &[Problem]) -> Vec<String> {
        problems.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn without_overlay_it_is_load_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "services.toml", SERVICES);
        write(dir.path(), "bad.toml", "[routes.reviews]\nto = 1\n");
        let paths = vec![dir.path().to_path_buf()];
        assert_eq!(check_with(&paths, &[]), load_once(&paths));
    }

    #[test]
    fn overlay_adds_replaces_and_removes_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "services.toml", SERVICES);
        let policy = write(dir.path(), "policy.toml", POLICY);
        let paths = vec![dir.path().to_path_buf()];
        let api = dir.path().join("api").join("routes-reviews.toml");

        // Added: a route to a declared subset is fine.
        let route = "[routes.reviews]\n[[routes.reviews.rules]]\nto = [{ subset = \"v2\" }]\n";
        let (catalog, problems) = check_with(&paths, &[(api.clone(), Some(route.into()))]);
        assert_eq!(messages(&problems), Vec::<String>::new());
        assert_eq!(catalog.routes["reviews"].origin.file, api);

        // Replaced: the policy without v2 breaks the overlaid route, reported in its file.
        let (_, problems) = check_with(
            &paths,
            &[
                (api.clone(), Some(route.into())),
                (
                    policy.clone(),
                    Some("[policies.reviews]\nsubsets = { v1 = { version = \"v1\" } }\n".into()),
                ),
            ],
        );
        assert_eq!(
            messages(&problems),
            [format!(
                "{}:3:18: routes.reviews.rules[0].to[0].subset: unknown subset \"v2\" of service \"reviews\" (declared subsets: v1)",
                api.display()
            )]
        );

        // Removed: without the policy, the subset is unknown too.
        let (_, problems) =
            check_with(&paths, &[(api.clone(), Some(route.into())), (policy, None)]);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].message.contains("no subsets declared"),
            "{problems:?}"
        );
        // Nothing was written.
        assert!(!api.exists());
    }

    #[test]
    fn overlay_reports_parse_errors_with_position() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "services.toml", SERVICES);
        let paths = vec![dir.path().to_path_buf()];
        let api = dir.path().join("routes-reviews.toml");
        let (_, problems) = check_with(
            &paths,
            &[(
                api.clone(),
                Some("[routes.reviews]\ntimeout = \"3s\"\nretry = 2\n".into()),
            )],
        );
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(
            (problems[0].file.as_path(), problems[0].line),
            (api.as_path(), 3)
        );
        assert!(problems[0].message.contains("retry"), "{problems:?}");
    }

    #[test]
    fn declared_lists_tables_of_valid_and_invalid_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let good = write(dir.path(), "a.toml", POLICY);
        let bad = write(
            dir.path(),
            "b.toml",
            "[policies.ratings]\nload_balancer = \"nope\"\n",
        );
        write(dir.path(), "c.toml", "this is not toml");
        let found = declared(&[dir.path().to_path_buf()], "policies");
        let names: Vec<(&Path, &str)> = found
            .iter()
            .map(|d| (d.file.as_path(), d.service.as_str()))
            .collect();
        assert_eq!(
            names,
            [(good.as_path(), "reviews"), (bad.as_path(), "ratings")]
        );
        assert_eq!(found[1].table["load_balancer"].as_str(), Some("nope"));
        assert_eq!(found[0].content, POLICY);
        assert!(declared(&[dir.path().to_path_buf()], "routes").is_empty());
    }
}

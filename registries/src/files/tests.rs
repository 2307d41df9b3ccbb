//! The registry as a whole: merging across files, last-good state, and the watcher loop.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use super::*;
use crate::model::Origin;

fn p(name: &str) -> PathBuf {
    PathBuf::from(format!("reg/{name}"))
}

/// A FileSet holding `files`, settled.
fn settled(files: &[(&str, &str)]) -> FileSet {
    let mut set = FileSet::default();
    for (name, text) in files {
        set.set(&p(name), Some(Ok(text.to_string())));
    }
    set.settle();
    set
}

fn catalog(set: &FileSet) -> Catalog {
    let (catalog, problems) = set.catalog();
    assert!(
        problems.is_empty(),
        "accepted files must merge cleanly: {problems:#?}"
    );
    catalog
}

fn messages(problems: &[Problem]) -> Vec<String> {
    problems.iter().map(ToString::to_string).collect()
}

const REVIEWS: &str = r#"
[services.reviews]
port = 9080

[[services.reviews.instances]]
address = "10.0.0.12"
port = 9080
labels = { version = "v1" }
"#;

const RULES: &str = r#"
[policies.reviews]
subsets = { v1 = { version = "v1" }, v2 = { version = "v2" } }

[routes.reviews]
[[routes.reviews.rules]]
to = [{ subset = "v1" }]

[[routes.reviews.rules]]
to = [{ subset = "v1", weight = 90 }, { subset = "v3", weight = 10 }]
"#;

#[test]
fn route_to_unknown_subset_names_file_line_and_field() {
    let set = settled(&[("reviews.toml", REVIEWS), ("rules.toml", RULES)]);
    assert_eq!(
        messages(&set.problems()),
        [
            r#"reg/rules.toml:10:50: routes.reviews.rules[1].to[1].subset: unknown subset "v3" of service "reviews" (declared subsets: v1, v2)"#
        ]
    );
    // The rules file stays out; the service is in.
    let c = catalog(&set);
    assert!(c.services.contains_key("reviews"));
    assert!(c.routes.is_empty() && c.policies.is_empty());
    let status = set.status();
    assert!(!status.files[&p("rules.toml")].in_force);
    assert!(status.files[&p("reviews.toml")].in_force);
    assert!(status.files[&p("reviews.toml")].problems.is_empty());
}

#[test]
fn subset_without_policy_says_so() {
    let set = settled(&[(
        "a.toml",
        "[services.a]\nport = 80\n[routes.a]\n[[routes.a.rules]]\nto = [{ subset = \"v1\" }]\n",
    )]);
    assert_eq!(
        messages(&set.problems()),
        [
            r#"reg/a.toml:5:18: routes.a.rules[0].to[0].subset: unknown subset "v1" of service "a" (no subsets declared; declare them in [policies.a] subsets)"#
        ]
    );
}

#[test]
fn instances_merge_across_files() {
    let more = "[[services.reviews.instances]]\naddress = \"10.0.0.13\"\nport = 9080\nlabels = { version = \"v2\" }\n";
    let set = settled(&[("reviews.toml", REVIEWS), ("more/reviews-v2.toml", more)]);
    assert!(set.problems().is_empty(), "{:#?}", set.problems());
    let c = catalog(&set);
    let service = &c.services["reviews"];
    assert_eq!(service.port, 9080);
    assert_eq!(
        service.origin,
        Origin {
            file: p("reviews.toml"),
            line: 2
        }
    );
    let addresses: Vec<&str> = service
        .instances
        .iter()
        .map(|i| i.address.as_str())
        .collect();
    // Files in path order: reg/more/... sorts before reg/reviews.toml.
    assert_eq!(addresses, ["10.0.0.13", "10.0.0.12"]);
}

#[test]
fn cross_file_conflicts_are_reported_on_the_later_file() {
    let again = "[services.reviews]\nport = 9090\n";
    let set = settled(&[("a.toml", REVIEWS), ("b.toml", again)]);
    assert_eq!(
        messages(&set.problems()),
        [
            r#"reg/b.toml:1:11: services.reviews: service "reviews" is already defined at reg/a.toml:2; its port, protocol and upstreams are set in one file (another file may add instances with a table that has only instances)"#
        ]
    );
    assert_eq!(catalog(&set).services["reviews"].port, 9080);

    let dup = "[[services.reviews.instances]]\naddress = \"10.0.0.12\"\nport = 9080\n";
    let set = settled(&[("a.toml", REVIEWS), ("b.toml", dup)]);
    assert_eq!(
        messages(&set.problems()),
        [
            r#"reg/b.toml:1:1: services.reviews.instances[0]: 10.0.0.12:9080 is already an instance of "reviews" at reg/a.toml:5"#
        ]
    );

    let policy = "[policies.reviews]\nload_balancer = \"random\"\n";
    let set = settled(&[("a.toml", REVIEWS), ("b.toml", policy), ("c.toml", policy)]);
    assert_eq!(
        messages(&set.problems()),
        [
            r#"reg/c.toml:1:11: policies.reviews: the policy for "reviews" is already declared at reg/b.toml:1; one file declares a service's policy"#
        ]
    );
}

#[test]
fn references_to_unknown_services_are_warnings_not_refusals() {
    let set = settled(&[
        (
            "a.toml",
            "[services.a]\nport = 80\nupstreams = [\"ghost\"]\n",
        ),
        (
            "b.toml",
            "[[services.b.instances]]\naddress = \"h\"\nport = 1\n",
        ),
        ("c.toml", "[routes.c]\ntimeout = \"1s\"\n"),
        ("d.toml", "[policies.d]\n"),
    ]);
    // Instances need their service's definition (its port and protocol); a reference to a
    // service only names it, and another source (Consul) may declare it.
    assert_eq!(
        messages(&set.problems()),
        [
            r#"reg/b.toml:1:12: services.b.instances: service "b" is not defined in any file (no [services.b] table with a port)"#,
        ]
    );
    let c = catalog(&set);
    assert!(c.services.contains_key("a") && c.routes.contains_key("c"));
    let warnings: Vec<String> = crate::references::unresolved(&c)
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        warnings,
        [
            r#"reg/a.toml:1: services.a.upstreams[0]: unknown service "ghost" (no file or Consul datacenter declares it yet)"#,
            r#"reg/c.toml:1: routes.c: unknown service "c" (no file or Consul datacenter declares it yet)"#,
            r#"reg/d.toml:1: policies.d: unknown service "d" (no file or Consul datacenter declares it yet)"#,
        ]
    );
}

#[test]
fn tcp_services_refuse_http_rules() {
    let set = settled(&[(
        "db.toml",
        "[services.db]\nprotocol = \"tcp\"\nport = 5432\n[routes.db]\nretries = { attempts = 1 }\n[[routes.db.rules]]\nmatch = { method = \"GET\" }\nto = [{}]\n",
    )]);
    assert_eq!(
        messages(&set.problems()),
        [
            r#"reg/db.toml:5:11: routes.db.retries: "db" is a tcp service; only HTTP services have request matches and retries"#,
            r#"reg/db.toml:7:9: routes.db.rules[0].match: "db" is a tcp service; only HTTP services have request matches and retries"#,
        ]
    );
}

#[test]
fn files_that_need_each_other_load_together() {
    let set = settled(&[
        ("a.toml", "[services.a]\nport = 80\nupstreams = [\"b\"]\n"),
        ("b.toml", "[services.b]\nport = 80\nupstreams = [\"a\"]\n"),
    ]);
    assert!(set.problems().is_empty());
    assert_eq!(catalog(&set).services.len(), 2);
}

#[test]
fn startup_loads_everything_good() {
    let set = settled(&[
        ("a.toml", REVIEWS),
        ("b.toml", "[services.ratings]\nport = = 1\n"),
        (
            "c.toml",
            "[services.details]\nport = 80\nupstreams = [\"ratings\"]\n",
        ),
        (
            "d.toml",
            "[services.web]\nport = 80\nupstreams = [\"reviews\"]\n",
        ),
    ]);
    let c = catalog(&set);
    assert_eq!(
        c.services.keys().collect::<Vec<_>>(),
        ["details", "reviews", "web"],
        "details names ratings, which is broken: a warning, not a refusal"
    );
    let status = set.status();
    let bad: Vec<&Path> = status
        .files
        .iter()
        .filter(|(_, s)| !s.in_force)
        .map(|(p, _)| p.as_path())
        .collect();
    assert_eq!(bad, [p("b.toml")]);
    assert!(status.files[&p("c.toml")].problems.is_empty());
}

#[test]
fn last_good_version_is_kept_after_a_bad_edit() {
    let mut set = settled(&[("reviews.toml", REVIEWS)]);
    let good = catalog(&set);

    // A syntax error: the file's previous version stays in force.
    set.set(
        &p("reviews.toml"),
        Some(Ok(REVIEWS.replace("port = 9080\n\n", "port = \n\n"))),
    );
    let outcome = set.settle();
    assert!(outcome.accepted.is_empty());
    assert_eq!(outcome.new_problems.len(), 1);
    assert_eq!(catalog(&set), good);
    let state = &set.status().files[&p("reviews.toml")];
    assert!(state.in_force);
    assert_eq!(state.problems.len(), 1);
    assert_eq!(state.problems[0].line, 3);

    // Settling again without a change reports nothing new (nothing is logged twice).
    assert_eq!(set.settle().new_problems, []);

    // Parses, but breaks a check: still the previous version.
    set.set(
        &p("reviews.toml"),
        Some(Ok(REVIEWS.replace(
            "port = 9080\n\n",
            "port = 9080\nmtls = \"on\"\n\n",
        ))),
    );
    set.settle();
    assert_eq!(catalog(&set), good);
    assert!(set.status().files[&p("reviews.toml")].problems[0]
        .message
        .contains("unknown mtls mode"));

    // Fixed: the new version comes in and the problems go.
    set.set(
        &p("reviews.toml"),
        Some(Ok(REVIEWS.replace("9080\n\n", "9090\n\n"))),
    );
    let outcome = set.settle();
    assert_eq!(outcome.accepted, [p("reviews.toml")]);
    assert_eq!(catalog(&set).services["reviews"].port, 9090);
    assert_eq!(
        set.status().files[&p("reviews.toml")],
        FileState {
            in_force: true,
            problems: vec![],
            restored: None,
        }
    );
}

#[test]
fn a_file_that_never_parsed_contributes_nothing() {
    let set = settled(&[("a.toml", "[services.a\n")]);
    assert_eq!(catalog(&set), Catalog::default());
    let state = &set.status().files[&p("a.toml")];
    assert!(!state.in_force);
    assert_eq!(state.problems.len(), 1);
}

#[test]
fn unreadable_file_is_a_problem_for_the_whole_file() {
    let mut set = settled(&[("a.toml", REVIEWS)]);
    set.set(&p("a.toml"), Some(Err("not UTF-8 text".into())));
    set.settle();
    assert!(catalog(&set).services.contains_key("reviews"));
    assert_eq!(messages(&set.problems()), ["reg/a.toml: not UTF-8 text"]);
}

#[test]
fn deleting_a_service_leaves_the_rules_that_name_it_unresolved() {
    let mut set = settled(&[
        ("reviews.toml", REVIEWS),
        ("rules.toml", &RULES.replace("v3", "v2")),
    ]);
    assert_eq!(catalog(&set).routes.len(), 1);

    // Deleting the service withdraws it; the rules that name it stay, unresolved (and are
    // translated into nothing) until some source declares reviews again.
    set.set(&p("reviews.toml"), None);
    let outcome = set.settle();
    assert_eq!(outcome.removed, [p("reviews.toml")]);
    let c = catalog(&set);
    assert!(!c.services.contains_key("reviews"));
    assert!(c.routes.contains_key("reviews"));
    assert!(set.status().files[&p("rules.toml")].in_force);
    assert!(!crate::references::unresolved(&c).is_empty());

    // Delete the rules too: nothing is left.
    set.set(&p("rules.toml"), None);
    let outcome = set.settle();
    assert_eq!(outcome.removed, [p("rules.toml")]);
    assert_eq!(catalog(&set), Catalog::default());
    assert!(set.status().files.is_empty());
}

#[test]
fn rules_for_a_service_declared_later_are_in_force_at_once() {
    let mut set = settled(&[("rules.toml", &RULES.replace("v3", "v2"))]);
    assert!(set.status().files[&p("rules.toml")].in_force);
    assert!(!crate::references::unresolved(&catalog(&set)).is_empty());
    set.set(&p("reviews.toml"), Some(Ok(REVIEWS.to_string())));
    let outcome = set.settle();
    assert_eq!(outcome.accepted, [p("reviews.toml")]);
    assert!(set.problems().is_empty());
    let c = catalog(&set);
    assert_eq!(c.routes.len(), 1);
    assert!(crate::references::unresolved(&c).is_empty());
}

#[test]
fn update_reparses_only_changed_files() {
    let mut set = FileSet::default();
    let scan = |files: &[(&str, &str)]| -> BTreeMap<PathBuf, state::FileRead> {
        files
            .iter()
            .map(|(n, t)| (p(n), Ok(t.to_string())))
            .collect()
    };
    assert!(set.update(scan(&[("a.toml", REVIEWS)]), &[]));
    assert!(!set.update(scan(&[("a.toml", REVIEWS)]), &[]));
    // A directory that could not be listed keeps its files.
    assert!(!set.update(scan(&[]), &[PathBuf::from("reg")]));
    assert!(set.update(scan(&[]), &[]));
}

#[test]
fn load_once_reads_nested_toml_and_skips_the_rest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    std::fs::create_dir_all(root.join("team/rules")).expect("mkdir");
    std::fs::create_dir_all(root.join(".git")).expect("mkdir");
    std::fs::write(root.join("reviews.toml"), REVIEWS).expect("write");
    std::fs::write(root.join("team/rules/rules.toml"), RULES).expect("write");
    std::fs::write(root.join("notes.txt"), "not toml").expect("write");
    std::fs::write(root.join(".#reviews.toml"), "garbage").expect("write");
    std::fs::write(root.join(".git/x.toml"), "garbage").expect("write");
    let single = root.join("single.conf");
    std::fs::write(&single, "[services.ratings]\nport = 9080\n").expect("write");

    let (c, problems) = load_once(&[root.to_path_buf(), single, root.join("missing")]);
    assert_eq!(
        c.services.keys().collect::<Vec<_>>(),
        ["ratings", "reviews"]
    );
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert_eq!(problems[0].file, root.join("team/rules/rules.toml"));
    assert_eq!(problems[0].line, 10);
}

/// Waits for `done` to hold for the latest value of `rx`, or fails after a deadline.
async fn wait_for<T>(rx: &mut channel::Receiver<T>, what: &str, done: impl Fn(&T) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if done(&rx.borrow_and_update()) {
            return;
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => panic!("channel closed while waiting for {what}"),
            Err(_) => panic!("timed out waiting for {what}"),
        }
    }
}

#[tokio::test]
async fn registry_publishes_changes_and_keeps_last_good() {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry_dir = dir.path().join("registry.d");
    let (catalog_tx, mut catalog_rx) = channel::channel(Arc::new(Catalog::default()));
    let (status_tx, mut status_rx) = channel::channel(Arc::new(FilesStatus::default()));
    let shutdown = CancellationToken::new();
    // The directory does not exist yet: the registry starts empty and notices it later.
    let registry = FileRegistry::new(vec![registry_dir.clone()]);
    let task = tokio::spawn(registry.run(catalog_tx, status_tx, shutdown.clone()));

    std::fs::create_dir(&registry_dir).expect("mkdir");
    let file = registry_dir.join("reviews.toml");
    // Write like an editor does: to a temporary name, then rename into place.
    let write = |text: &str| {
        let tmp = registry_dir.join(".reviews.toml.tmp");
        std::fs::write(&tmp, text).expect("write");
        std::fs::rename(&tmp, &file).expect("rename");
    };
    write(REVIEWS);
    wait_for(&mut catalog_rx, "reviews in the catalog", |c| {
        c.services.contains_key("reviews")
    })
    .await;
    let good = catalog_rx.borrow().clone();

    write(&REVIEWS.replace("port = 9080\n\n", "port = 0\n\n"));
    wait_for(&mut status_rx, "the problem in the status", |s| {
        s.files.get(&file).is_some_and(|f| !f.problems.is_empty())
    })
    .await;
    let state = status_rx.borrow().files[&file].clone();
    assert!(state.in_force);
    assert_eq!(state.problems[0].line, 3);
    assert_eq!(state.problems[0].key_path, "services.reviews.port");
    assert!(state.problems[0].message.starts_with("0 is not a port"));
    assert_eq!(
        *catalog_rx.borrow(),
        good,
        "the bad edit must not change the catalog"
    );
    assert!(
        !catalog_rx.has_changed().expect("open"),
        "nothing new was published"
    );

    // A good edit replaces it; deleting the file withdraws it.
    write(&REVIEWS.replace("port = 9080\n\n", "port = 9090\n\n"));
    wait_for(&mut catalog_rx, "the new port", |c| {
        c.services.get("reviews").is_some_and(|s| s.port == 9090)
    })
    .await;
    std::fs::remove_file(&file).expect("remove");
    wait_for(&mut catalog_rx, "an empty catalog", |c| {
        c.services.is_empty()
    })
    .await;

    shutdown.cancel();
    let result = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("stops on shutdown");
    result.expect("task").expect("run");
}

/// A store holding `files` as the last good versions of an earlier run.
fn stored(
    files: &[(&str, &str)],
) -> (
    tempfile::TempDir,
    BTreeMap<PathBuf, crate::last_good::StoredFile>,
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = LastGoodStore::in_state_dir(dir.path());
    for (name, text) in files {
        store.save_file(&p(name), text).expect("save");
    }
    let loaded = store.load_files();
    (dir, loaded)
}

#[test]
fn a_broken_file_falls_back_to_its_stored_version_after_a_restart() {
    let (_dir, store) = stored(&[("reviews.toml", REVIEWS), ("routes.toml", RULES_OK)]);
    // The "restart": a fresh set whose reviews.toml is broken on disk.
    let mut set = FileSet::default();
    set.set(
        &p("reviews.toml"),
        Some(Ok("[services.reviews]
port = 
"
        .into())),
    );
    set.set(&p("routes.toml"), Some(Ok(RULES_OK.into())));
    set.restore(store);
    let outcome = set.settle();
    assert!(
        outcome.accepted.is_empty(),
        "restored files that did not change: {outcome:?}"
    );
    assert_eq!(outcome.new_problems.len(), 1);
    assert_eq!(
        outcome.new_problems[0].line, 2,
        "the problem names the line on disk"
    );
    let c = catalog(&set);
    assert_eq!(
        c.services["reviews"].instances.len(),
        1,
        "the stored version serves"
    );
    assert!(
        c.routes.contains_key("reviews"),
        "and the route that needs it stays"
    );
    let state = &set.status().files[&p("reviews.toml")];
    assert!(state.in_force && !state.problems.is_empty());
    assert!(state.restored.is_some(), "marked as restored: {state:?}");
    assert_eq!(
        set.status().files[&p("routes.toml")].restored,
        None,
        "its disk version is the same"
    );

    // Fixed on disk: the new version replaces the stored one and the mark goes.
    set.set(
        &p("reviews.toml"),
        Some(Ok(REVIEWS.replace(
            "9080

", "9090

",
        ))),
    );
    set.settle();
    assert_eq!(catalog(&set).services["reviews"].port, 9090);
    assert_eq!(set.status().files[&p("reviews.toml")].restored, None);
    assert!(set.restored().is_empty());
}

#[test]
fn a_deleted_file_is_not_brought_back_from_the_store() {
    let (_dir, store) = stored(&[
        ("reviews.toml", REVIEWS),
        (
            "web.toml",
            "[services.web]
port = 80
",
        ),
    ]);
    let mut set = FileSet::default();
    set.set(
        &p("web.toml"),
        Some(Ok("[services.web]
port = 80
"
        .into())),
    );
    set.restore(store);
    set.settle();
    let c = catalog(&set);
    assert_eq!(c.services.keys().collect::<Vec<_>>(), ["web"]);
    assert!(!set.status().files.contains_key(&p("reviews.toml")));
    assert!(set.restored().is_empty());
}

#[test]
fn a_good_file_on_disk_wins_over_its_stored_version() {
    let (_dir, store) = stored(&[("reviews.toml", REVIEWS)]);
    let mut set = FileSet::default();
    set.set(
        &p("reviews.toml"),
        Some(Ok(REVIEWS.replace(
            "9080

", "9090

",
        ))),
    );
    set.restore(store);
    let outcome = set.settle();
    assert_eq!(outcome.accepted, [p("reviews.toml")]);
    assert_eq!(catalog(&set).services["reviews"].port, 9090);
    assert!(set.restored().is_empty());
}

#[test]
fn stored_versions_that_no_longer_fit_together_are_left_out() {
    // The stored route needs subsets of a policy in a file that is deleted now.
    let (_dir, store) = stored(&[
        ("reviews.toml", REVIEWS),
        (
            "policy.toml",
            "[policies.reviews]
subsets = { v1 = { version = \"v1\" } }
",
        ),
        (
            "route.toml",
            "[routes.reviews]\n[[routes.reviews.rules]]\nto = [{ subset = \"v1\" }]\n",
        ),
    ]);
    let mut set = FileSet::default();
    set.set(&p("reviews.toml"), Some(Ok(REVIEWS.into())));
    set.set(
        &p("route.toml"),
        Some(Ok("[routes.reviews
"
        .into())),
    );
    set.restore(store);
    set.settle();
    let c = catalog(&set);
    assert!(
        c.routes.is_empty(),
        "the route cannot come back without its policy"
    );
    assert!(c.services.contains_key("reviews"));
}

#[tokio::test]
async fn registry_restarts_from_the_store_and_keeps_it_current() {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry_dir = dir.path().join("registry.d");
    std::fs::create_dir(&registry_dir).expect("mkdir");
    let store = LastGoodStore::in_state_dir(&dir.path().join("state"));
    let file = registry_dir.join("reviews.toml");
    std::fs::write(&file, REVIEWS).expect("write");
    let gone = registry_dir.join("gone.toml");
    std::fs::write(
        &gone,
        "[services.gone]
port = 80
",
    )
    .expect("write");

    // First run: both files are stored.
    let run = |store: LastGoodStore| {
        let (catalog_tx, catalog_rx) = channel::channel(Arc::new(Catalog::default()));
        let (status_tx, status_rx) = channel::channel(Arc::new(FilesStatus::default()));
        let shutdown = CancellationToken::new();
        let registry = FileRegistry::new(vec![registry_dir.clone()]).with_last_good(store);
        let task = tokio::spawn(registry.run(catalog_tx, status_tx, shutdown.clone()));
        (catalog_rx, status_rx, shutdown, task)
    };
    let (mut catalog_rx, _status, shutdown, task) = run(store.clone());
    wait_for(&mut catalog_rx, "both services", |c| c.services.len() == 2).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while store.load_files().len() < 2 {
        assert!(tokio::time::Instant::now() < deadline, "both files stored");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    task.await.expect("task").expect("run");

    // While discovery is down: one file breaks, the other is deleted on purpose.
    std::fs::write(
        &file,
        "[services.reviews]
port = 
",
    )
    .expect("break");
    std::fs::remove_file(&gone).expect("delete");
    let (catalog, problems) = load_once_with(std::slice::from_ref(&registry_dir), Some(&store));
    assert_eq!(catalog.services.keys().collect::<Vec<_>>(), ["reviews"]);
    assert_eq!(problems.len(), 1);
    assert_eq!(
        load_once(std::slice::from_ref(&registry_dir))
            .0
            .services
            .len(),
        0,
        "without the store: nothing"
    );

    let (mut catalog_rx, mut status_rx, shutdown, task) = run(store.clone());
    wait_for(&mut status_rx, "reviews restored", |s| {
        s.files
            .get(&file)
            .is_some_and(|f| f.in_force && f.restored.is_some())
    })
    .await;
    wait_for(&mut catalog_rx, "only reviews", |c| {
        c.services.keys().collect::<Vec<_>>() == ["reviews"]
    })
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while store.load_files().contains_key(&gone) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the deleted file's copy is removed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The stored copy of the broken file is still the good one.
    assert_eq!(store.load_files()[&file].content, REVIEWS);

    // Fixed: picked up, stored, no longer marked.
    let tmp = registry_dir.join(".reviews.toml.tmp");
    std::fs::write(
        &tmp,
        REVIEWS.replace(
            "9080

", "9090

",
        ),
    )
    .expect("write");
    std::fs::rename(&tmp, &file).expect("rename");
    wait_for(&mut catalog_rx, "the fixed file", |c| {
        c.services.get("reviews").is_some_and(|s| s.port == 9090)
    })
    .await;
    wait_for(&mut status_rx, "no longer restored", |s| {
        s.files
            .get(&file)
            .is_some_and(|f| f.restored.is_none() && f.problems.is_empty())
    })
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !store.load_files()[&file].content.contains("9090") {
        assert!(tokio::time::Instant::now() < deadline, "the fix is stored");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    task.await.expect("task").expect("run");
}

const RULES_OK: &str = r#"
[policies.reviews]
subsets = { v1 = { version = "v1" } }

[routes.reviews]
[[routes.reviews.rules]]
to = [{ subset = "v1" }]
"#;

const AUTHZ: &str = r#"
[[authorization.reviews.rules]]
action = "allow"
from = ["productpage"]
methods = ["GET"]
paths = ["/reviews/*"]
"#;

#[test]
fn authorization_checks_across_files_and_keeps_the_last_good() {
    let pp = "[services.productpage]\nport = 9080\n";
    let mut set = settled(&[
        ("reviews.toml", REVIEWS),
        ("pp.toml", pp),
        ("authz.toml", AUTHZ),
    ]);
    assert!(set.problems().is_empty(), "{:#?}", set.problems());
    let c = catalog(&set);
    let a = &c.authorizations["reviews"];
    assert_eq!(a.rules[0].from, ["productpage"]);
    assert_eq!(
        a.origin,
        Origin {
            file: p("authz.toml"),
            line: 2
        }
    );

    // An edit naming an unknown source is in force, with a warning naming file, line and
    // field (Consul may declare the service).
    let ghost = AUTHZ.replace("[\"productpage\"]", "[\"productpage\", \"ghost\"]");
    set.set(&p("authz.toml"), Some(Ok(ghost)));
    set.settle();
    assert!(set.problems().is_empty());
    let warnings: Vec<String> = crate::references::unresolved(&catalog(&set))
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        warnings,
        [
            r#"reg/authz.toml:2: authorization.reviews.rules[0].from[1]: unknown service "ghost" (no file or Consul datacenter declares it yet)"#
        ]
    );

    // An edit that breaks a check is refused with file:line:column and field; the last good
    // version stays in force.
    let bad = AUTHZ.replace("methods = [\"GET\"]", "methods = [\"get\"]");
    set.set(&p("authz.toml"), Some(Ok(bad)));
    set.settle();
    assert_eq!(
        messages(&set.problems()),
        [
            r#"reg/authz.toml:5:12: authorization.reviews.rules[0].methods[0]: "get" is not an HTTP method (upper case, like GET)"#
        ]
    );
    assert_eq!(
        catalog(&set).authorizations["reviews"].rules[0].from,
        ["productpage", "ghost"]
    );
    assert!(!set.status().files[&p("authz.toml")].problems.is_empty());

    // Another file declaring the same service's authorization.
    let set = settled(&[
        ("reviews.toml", REVIEWS),
        ("pp.toml", pp),
        ("authz.toml", AUTHZ),
        (
            "more.toml",
            "[[authorization.reviews.rules]]\naction = \"deny\"\n",
        ),
    ]);
    assert_eq!(
        messages(&set.problems()),
        [
            r#"reg/more.toml:1:17: authorization.reviews: the authorization for "reviews" is already declared at reg/authz.toml:2; one file declares a service's authorization"#
        ]
    );

    // Unknown service in the key: in force (Consul may declare it), with a warning.
    let set = settled(&[(
        "authz.toml",
        "[[authorization.ghost.rules]]\naction = \"deny\"\n",
    )]);
    assert!(set.problems().is_empty());
    let warnings = crate::references::unresolved(&catalog(&set));
    assert_eq!(warnings[0].field, "authorization.ghost");
}

#[test]
fn tcp_services_refuse_http_authorization() {
    let db = "[services.db]\nprotocol = \"tcp\"\nport = 5432\n[services.app]\nport = 80\n";
    let rules = "[[authorization.db.rules]]\naction = \"allow\"\nfrom = [\"app\"]\nmethods = [\"GET\"]\npaths = [\"/x\"]\n";
    let set = settled(&[("db.toml", db), ("rules.toml", rules)]);
    assert_eq!(
        messages(&set.problems()),
        [
            r#"reg/rules.toml:4:11: authorization.db.rules[0].methods: "db" is a tcp service; only HTTP services have methods and paths"#,
            r#"reg/rules.toml:5:9: authorization.db.rules[0].paths: "db" is a tcp service; only HTTP services have methods and paths"#,
        ]
    );
    // By source identity alone is fine for TCP.
    let rules = "[[authorization.db.rules]]\naction = \"allow\"\nfrom = [\"app\"]\n";
    let set = settled(&[("db.toml", db), ("rules.toml", rules)]);
    assert!(set.problems().is_empty(), "{:#?}", set.problems());
    assert_eq!(catalog(&set).authorizations["db"].rules.len(), 1);
}

use super::*;

const TEXT: &str = r#"top = "x"
list = ["a", "b"]

[registry.consul]
wait = "soon"

[services."a.b"]
port = 0

[[gateways]]
name = "g"
"#;

fn located(key_path: &str) -> String {
    let mut problems = FileProblems::new("d.toml", TEXT);
    problems.push(key_path, "bad");
    problems.into_vec()[0].to_string()
}

#[test]
fn display_is_file_line_column_key_message() {
    let p = Problem::new("reg/a.toml", 3, 7, "services.a.port", "0 is not a port");
    assert_eq!(
        p.to_string(),
        "reg/a.toml:3:7: services.a.port: 0 is not a port"
    );
    let whole = Problem::whole_file("reg/a.toml", "", "not UTF-8 text");
    assert_eq!(whole.to_string(), "reg/a.toml: not UTF-8 text");
    let missing = Problem::whole_file("agent.toml", "node", "is required");
    assert_eq!(missing.to_string(), "agent.toml: node: is required");
    let syntax = Problem::new("a.toml", 1, 2, "", "expected `=`");
    assert_eq!(syntax.to_string(), "a.toml:1:2: expected `=`");
}

#[test]
fn problems_are_placed_at_their_key() {
    assert_eq!(located("top"), "d.toml:1:7: top: bad");
    assert_eq!(located("list[1]"), "d.toml:2:14: list[1]: bad");
    assert_eq!(
        located("registry.consul.wait"),
        "d.toml:5:8: registry.consul.wait: bad"
    );
    assert_eq!(
        located("services.\"a.b\".port"),
        "d.toml:8:8: services.\"a.b\".port: bad"
    );
    assert_eq!(
        located("gateways[0].name"),
        "d.toml:11:8: gateways[0].name: bad"
    );
}

#[test]
fn a_missing_key_is_placed_at_its_nearest_written_table_or_the_whole_file() {
    let at_table = located("registry.consul.datacenters");
    assert!(
        at_table.starts_with("d.toml:4:")
            && at_table.ends_with(": registry.consul.datacenters: bad"),
        "{at_table}"
    );
    assert_eq!(located("node"), "d.toml: node: bad");
}

#[test]
fn toml_errors_carry_the_key_they_point_at() {
    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Raw {
        top: String,
        inner: Inner,
    }
    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        port: u16,
    }
    let text = "top = \"x\"\n[inner]\nport = \"80\"\n";
    let err = toml::from_str::<Raw>(text).expect_err("wrong type");
    let mut problems = FileProblems::new("f.toml", text);
    problems.toml_error(&err);
    let p = &problems.into_vec()[0];
    assert_eq!(
        (p.line, p.column, p.key_path.as_str()),
        (3, 8, "inner.port"),
        "{p}"
    );
    assert!(!p.message.contains('\n'), "{p}");

    let text = "top = \"x\"\n[inner]\nport = 80\nprot = 1\n";
    let err = toml::from_str::<Raw>(text).expect_err("unknown key");
    let mut problems = FileProblems::new("f.toml", text);
    problems.toml_error(&err);
    let p = &problems.into_vec()[0];
    assert_eq!(
        (p.line, p.column, p.key_path.as_str()),
        (4, 1, "inner.prot"),
        "{p}"
    );

    let text = "top = \"x\n";
    let err = toml::from_str::<Raw>(text).expect_err("syntax");
    let mut problems = FileProblems::new("f.toml", text);
    problems.toml_error(&err);
    assert_eq!(problems.into_vec()[0].line, 1);
}

#[test]
fn durations_are_reported_under_their_key() {
    let text = "[ca]\nnode_ttl = \"soon\"\n";
    let mut problems = FileProblems::new("d.toml", text);
    assert_eq!(
        problems.duration("ca.node_ttl", "7d"),
        Some(Duration::from_secs(7 * 86_400))
    );
    assert!(problems.is_empty());
    assert_eq!(problems.duration("ca.node_ttl", "soon"), None);
    let shown = problems.into_vec()[0].to_string();
    assert!(
        shown.starts_with("d.toml:2:12: ca.node_ttl: \"soon\" is not a duration"),
        "{shown}"
    );
}

#[test]
fn problems_come_in_file_order() {
    let mut problems = FileProblems::new("d.toml", TEXT);
    problems.push("registry.consul.wait", "third");
    problems.push("top", "second");
    problems.push("node", "first");
    let order: Vec<String> = problems.into_vec().into_iter().map(|p| p.message).collect();
    assert_eq!(order, ["first", "second", "third"]);
}

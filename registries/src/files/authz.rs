//! Authorizations in one file: `[[authorization.<svc>.rules]]`, as serde sees them and as
//! checked one file at a time. Part of [`super::parse`]; the checks that need other files (is
//! the service defined, are the `from` services, is it a TCP service) are in
//! [`super::validate`].
//!
//! ```toml
//! [[authorization.reviews.rules]]
//! action = "allow"              # allow | deny
//! from = ["productpage"]        # source services; omit = any authenticated peer
//! methods = ["GET"]             # HTTP only; omit = any
//! paths = ["/reviews/*"]        # HTTP only; "/x/*" = prefix "/x/", otherwise exact; omit = any
//! ```
//!
//! Paths are held to what can match a request path after Envoy's normalization (the inbound
//! connection manager normalizes and merges slashes), so that a deny rule can never be written
//! in a form that silently matches nothing: no query or fragment, no `//`, no `.` or `..`
//! segments, and `*` only as a trailing `/*`.

use std::collections::BTreeSet;

use serde::Deserialize;
use toml::Spanned;

use super::parse::{key, Context, Pos};
use crate::model::{Authorization, AuthzAction, AuthzRule, PathMatch};

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AuthzDecl {
    pub pos: Pos,
    pub authorization: Authorization,
    /// Every `from` entry, to check against the defined services.
    pub from_refs: Vec<FromRef>,
    /// Where methods and paths are set, so that a TCP service can refuse them.
    pub http_only: Vec<(String, Pos)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FromRef {
    /// The field path, `authorization.reviews.rules[0].from[1]`.
    pub field: String,
    pub service: String,
    pub pos: Pos,
}

// ---- the tables as serde sees them ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuthorization {
    rules: Option<Spanned<Vec<Spanned<RawAuthzRule>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuthzRule {
    action: Spanned<String>,
    from: Option<Spanned<Vec<Spanned<String>>>>,
    methods: Option<Spanned<Vec<Spanned<String>>>>,
    paths: Option<Spanned<Vec<Spanned<String>>>>,
}

impl Context {
    pub(super) fn authorization(
        &mut self,
        name: Spanned<String>,
        raw: Spanned<RawAuthorization>,
    ) -> (String, AuthzDecl) {
        let path = format!("authorization.{}", key(name.get_ref()));
        self.name(&name, &path, "service");
        let mut from_refs = Vec::new();
        let mut http_only = Vec::new();
        let mut rules = Vec::new();
        match raw.into_inner().rules {
            None => self.report(
                name.span(),
                &format!("{path}.rules"),
                "missing; an authorization needs at least one rule ([[authorization.<service>.rules]])",
            ),
            Some(list) if list.get_ref().is_empty() => self.report(
                list.span(),
                &format!("{path}.rules"),
                "an authorization needs at least one rule",
            ),
            Some(list) => {
                for (i, rule) in list.into_inner().into_iter().enumerate() {
                    let rule_path = format!("{path}.rules[{i}]");
                    let origin = self.origin(rule.span());
                    let rule = rule.into_inner();
                    let action = rule.action.get_ref().parse().unwrap_or_else(|message| {
                        self.report(rule.action.span(), &format!("{rule_path}.action"), message);
                        AuthzAction::default()
                    });
                    let from = match rule.from {
                        Some(list) => {
                            let field = format!("{rule_path}.from");
                            let from = self.names_list(&field, list);
                            for (j, (service, pos)) in from.iter().enumerate() {
                                from_refs.push(FromRef {
                                    field: format!("{field}[{j}]"),
                                    service: service.clone(),
                                    pos: *pos,
                                });
                            }
                            from.into_iter().map(|(s, _)| s).collect()
                        }
                        None => Vec::new(),
                    };
                    let methods = match rule.methods {
                        Some(list) => {
                            let field = format!("{rule_path}.methods");
                            http_only.push((field.clone(), self.pos(list.span())));
                            self.methods(&field, list)
                        }
                        None => Vec::new(),
                    };
                    let paths = match rule.paths {
                        Some(list) => {
                            let field = format!("{rule_path}.paths");
                            http_only.push((field.clone(), self.pos(list.span())));
                            self.paths(&field, list)
                        }
                        None => Vec::new(),
                    };
                    rules.push(AuthzRule {
                        action,
                        from,
                        methods,
                        paths,
                        origin,
                    });
                }
            }
        }
        let decl = AuthzDecl {
            pos: self.pos(name.span()),
            authorization: Authorization {
                service: name.get_ref().clone(),
                rules,
                origin: self.origin(name.span()),
            },
            from_refs,
            http_only,
        };
        (name.into_inner(), decl)
    }

    /// Reports an empty list (an omitted key is how "any" is said) and duplicate entries; returns
    /// the entries with their positions.
    fn list(
        &mut self,
        field: &str,
        list: Spanned<Vec<Spanned<String>>>,
        omitted: &str,
    ) -> Vec<(Spanned<String>, String)> {
        if list.get_ref().is_empty() {
            self.report(
                list.span(),
                field,
                format!("must not be empty (omit it for {omitted})"),
            );
        }
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        for (j, item) in list.into_inner().into_iter().enumerate() {
            let item_field = format!("{field}[{j}]");
            if !seen.insert(item.get_ref().clone()) {
                self.report(
                    item.span(),
                    &item_field,
                    format!("\"{}\" is listed twice", item.get_ref()),
                );
            }
            out.push((item, item_field));
        }
        out
    }

    fn names_list(
        &mut self,
        field: &str,
        list: Spanned<Vec<Spanned<String>>>,
    ) -> Vec<(String, Pos)> {
        let items = self.list(field, list, "any authenticated peer");
        items
            .into_iter()
            .map(|(item, item_field)| {
                self.name(&item, &item_field, "service");
                let pos = self.pos(item.span());
                (item.into_inner(), pos)
            })
            .collect()
    }

    fn methods(&mut self, field: &str, list: Spanned<Vec<Spanned<String>>>) -> Vec<String> {
        let items = self.list(field, list, "any method");
        items
            .into_iter()
            .map(|(item, item_field)| {
                let m = item.get_ref();
                if m.is_empty() || !m.chars().all(|c| c.is_ascii_uppercase()) {
                    self.report(
                        item.span(),
                        &item_field,
                        format!("\"{m}\" is not an HTTP method (upper case, like GET)"),
                    );
                }
                item.into_inner()
            })
            .collect()
    }

    fn paths(&mut self, field: &str, list: Spanned<Vec<Spanned<String>>>) -> Vec<PathMatch> {
        let items = self.list(field, list, "any path");
        items
            .into_iter()
            .map(|(item, item_field)| {
                let (matcher, problem) = path_match(item.get_ref());
                if let Some(message) = problem {
                    self.report(item.span(), &item_field, message);
                }
                matcher
            })
            .collect()
    }
}

/// `"/x/*"` -> prefix `/x/`, anything else exact; and why the text cannot be a rule path.
fn path_match(text: &str) -> (PathMatch, Option<String>) {
    let (matcher, body) = match text.strip_suffix("/*") {
        Some(stem) => {
            let prefix = format!("{stem}/");
            (PathMatch::Prefix(prefix.clone()), prefix)
        }
        None => (PathMatch::Exact(text.to_string()), text.to_string()),
    };
    let problem = if !text.starts_with('/') {
        Some(format!("\"{text}\" must start with '/'"))
    } else if body.contains('*') {
        Some(format!(
            "\"{text}\": '*' is only allowed as a trailing \"/*\" (a prefix)"
        ))
    } else if body.contains(['?', '#']) {
        Some(format!(
            "\"{text}\": a path has no query or fragment (rules match the path alone)"
        ))
    } else if body.contains("//")
        || body
            .split('/')
            .any(|segment| segment == "." || segment == "..")
    {
        Some(format!(
            "\"{text}\" is not a normalized path (no \"//\", \".\" or \"..\" segments), so no request would match it"
        ))
    } else if body.contains('%') {
        Some(format!(
            "\"{text}\": percent-encoding is not supported in rule paths (write the character itself)"
        ))
    } else if body.chars().any(|c| c.is_ascii_control() || c == ' ') {
        Some(format!("\"{text}\" contains spaces or control characters"))
    } else {
        None
    };
    (matcher, problem)
}

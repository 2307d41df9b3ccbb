//! Translation with mTLS on: TLS contexts, the mesh port's filter chains, authorization as RBAC.

use envoy_types::pb::envoy::config::core::v3::{
    config_source::ConfigSourceSpecifier, grpc_service::TargetSpecifier, transport_socket,
    TransportSocket,
};
use envoy_types::pb::envoy::config::listener::v3::{listener_filter, FilterChain};
use envoy_types::pb::envoy::config::rbac::v3::{
    permission, principal, rbac::Action, Principal, Rbac,
};
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::{Rbac as HttpRbac, RbacPerRoute};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::{ForwardClientCertDetails, PathWithEscapedSlashesAction},
    http_filter,
};
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetworkRbac;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    common_tls_context::ValidationContextType, subject_alt_name_matcher::SanType, CommonTlsContext,
    DownstreamTlsContext, SdsSecretConfig, UpstreamTlsContext,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{path_matcher, StringMatcher};
use pilotfish_registries::model::{Authorization, AuthzAction, AuthzRule, MtlsMode, PathMatch};

use super::*;

fn rule(action: AuthzAction, from: &[&str], methods: &[&str], paths: &[PathMatch]) -> AuthzRule {
    AuthzRule {
        action,
        from: from.iter().map(|s| s.to_string()).collect(),
        methods: methods.iter().map(|s| s.to_string()).collect(),
        paths: paths.to_vec(),
        origin: Default::default(),
    }
}

fn authorize(c: &mut Catalog, service: &str, rules: Vec<AuthzRule>) {
    c.authorizations.insert(
        service.to_string(),
        Authorization {
            service: service.to_string(),
            rules,
            origin: Default::default(),
        },
    );
}

/// The demo, with "only productpage may GET /reviews/*" on reviews.
fn demo_authz() -> Catalog {
    let mut c = demo();
    authorize(
        &mut c,
        "reviews",
        vec![rule(
            AuthzAction::Allow,
            &["productpage"],
            &["GET"],
            &[PathMatch::Prefix("/reviews/".into())],
        )],
    );
    c
}

fn build(c: Catalog) -> Shared {
    Shared::build_with(Arc::new(c), mtls_settings())
}

fn tls_any(ts: &Option<TransportSocket>) -> &Any {
    let ts = ts.as_ref().expect("a transport socket");
    assert_eq!(ts.name, "envoy.transport_sockets.tls");
    match &ts.config_type {
        Some(transport_socket::ConfigType::TypedConfig(any)) => any,
        other => panic!("{other:?}"),
    }
}

/// The SDS secret names, checking each comes from the agent's SDS cluster over gRPC v3.
fn sds_name(sds: &SdsSecretConfig) -> &str {
    let source = sds.sds_config.as_ref().unwrap();
    let Some(ConfigSourceSpecifier::ApiConfigSource(api)) = &source.config_source_specifier else {
        panic!("not an API config source: {source:?}")
    };
    assert_eq!(api.api_type, 2, "GRPC");
    assert_eq!(api.transport_api_version, 2, "V3");
    assert_eq!(source.resource_api_version, 2, "V3");
    let Some(TargetSpecifier::EnvoyGrpc(grpc)) = &api.grpc_services[0].target_specifier else {
        panic!()
    };
    assert_eq!(grpc.cluster_name, "pilotfish-sds");
    &sds.name
}

/// (certificate secrets, SAN matchers as (type, matcher), roots secret); no inline certificate.
fn common(ctx: &CommonTlsContext) -> (Vec<&str>, Vec<(i32, &StringMatcher)>, &str) {
    assert!(
        ctx.tls_certificates.is_empty(),
        "certificates only come from SDS"
    );
    let certs = ctx
        .tls_certificate_sds_secret_configs
        .iter()
        .map(sds_name)
        .collect();
    let Some(ValidationContextType::CombinedValidationContext(combined)) =
        &ctx.validation_context_type
    else {
        panic!("{:?}", ctx.validation_context_type)
    };
    let default = combined.default_validation_context.as_ref().unwrap();
    assert!(default.trusted_ca.is_none());
    let sans = default
        .match_typed_subject_alt_names
        .iter()
        .map(|m| (m.san_type, m.matcher.as_ref().unwrap()))
        .collect();
    let roots = sds_name(
        combined
            .validation_context_sds_secret_config
            .as_ref()
            .unwrap(),
    );
    (certs, sans, roots)
}

fn exact_str(m: &StringMatcher) -> &str {
    match &m.match_pattern {
        Some(MatchPattern::Exact(s)) => s,
        other => panic!("{other:?}"),
    }
}

fn prefix_str(m: &StringMatcher) -> &str {
    match &m.match_pattern {
        Some(MatchPattern::Prefix(s)) => s,
        other => panic!("{other:?}"),
    }
}

fn chain<'a>(l: &'a Listener, name: &str) -> &'a FilterChain {
    l.filter_chains
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no chain {name}"))
}

fn chain_hcm(c: &FilterChain) -> HttpConnectionManager {
    assert_eq!(c.filters.len(), 1);
    let Some(filter::ConfigType::TypedConfig(any)) = &c.filters[0].config_type else {
        panic!()
    };
    unpack(any)
}

fn http_rbac(hcm: &HttpConnectionManager, name: &str) -> HttpRbac {
    let f = hcm
        .http_filters
        .iter()
        .find(|f| f.name == name)
        .unwrap_or_else(|| panic!("no filter {name}"));
    let Some(http_filter::ConfigType::TypedConfig(any)) = &f.config_type else {
        panic!()
    };
    unpack(any)
}

fn ids(p: &Principal) -> &[Principal] {
    match &p.identifier {
        Some(principal::Identifier::OrIds(set)) | Some(principal::Identifier::AndIds(set)) => {
            &set.ids
        }
        other => panic!("not a set: {other:?}"),
    }
}

fn is_and(p: &Principal) -> bool {
    matches!(p.identifier, Some(principal::Identifier::AndIds(_)))
}

fn is_or(p: &Principal) -> bool {
    matches!(p.identifier, Some(principal::Identifier::OrIds(_)))
}

/// The one policy of an RBAC config: checks its shape and returns its one principal.
fn policy(rbac: &Rbac, action: Action) -> &Principal {
    assert_eq!(rbac.action, action as i32);
    assert_eq!(
        rbac.policies.len(),
        1,
        "one policy per filter (determinism)"
    );
    let p = &rbac.policies["pilotfish"];
    assert_eq!(p.permissions.len(), 1);
    assert_eq!(p.permissions[0].rule, Some(permission::Rule::Any(true)));
    assert_eq!(p.principals.len(), 1);
    let top = &p.principals[0];
    assert!(is_or(top), "or_ids over rules");
    top
}

fn principal_name(p: &Principal) -> Option<&str> {
    match &p.identifier {
        Some(principal::Identifier::Authenticated(a)) => a.principal_name.as_ref().map(exact_str),
        other => panic!("not authenticated: {other:?}"),
    }
}

#[test]
fn outbound_clusters_verify_the_exact_server_identity() {
    let shared = build(demo_authz());
    // productpage's proxy presents productpage's certificate.
    let res = shared.for_proxy(&proxy("vm-a", "10.0.0.11"));
    for name in [
        "outbound|reviews",
        "outbound|reviews|v1",
        "outbound|reviews|v2",
    ] {
        let c: Cluster = decode(&res.clusters, name);
        assert!(c.transport_socket_matches.is_empty(), "{name}");
        let ctx: UpstreamTlsContext = unpack(tls_any(&c.transport_socket));
        assert_eq!(ctx.sni, "reviews.pilotfish.local", "{name}");
        let (certs, sans, roots) = common(ctx.common_tls_context.as_ref().unwrap());
        assert_eq!(certs, ["service/productpage"]);
        assert_eq!(sans.len(), 1);
        assert_eq!(sans[0].0, SanType::Uri as i32);
        assert_eq!(
            exact_str(sans[0].1),
            "spiffe://pilotfish.local/service/reviews"
        );
        assert_eq!(roots, "roots");
        assert!(ctx.common_tls_context.unwrap().alpn_protocols.is_empty());
    }
    // The endpoints are still the peers' mesh ports.
    let cla: ClusterLoadAssignment = decode(&res.endpoints, "outbound|reviews");
    let Some(HostIdentifier::Endpoint(ep)) = &cla.endpoints[0].lb_endpoints[0].host_identifier
    else {
        panic!()
    };
    assert_eq!(socket(&ep.address), ("10.0.0.12".into(), 15006));

    // A host with no service presents the node certificate, and shares the scope's clusters.
    let x = shared.for_proxy(&proxy("vm-x", "10.0.0.99"));
    let y = shared.for_proxy(&proxy("vm-y", "10.0.0.98"));
    assert!(Arc::ptr_eq(&x.clusters, &y.clusters));
    let c: Cluster = decode(&x.clusters, "outbound|ratings");
    let ctx: UpstreamTlsContext = unpack(tls_any(&c.transport_socket));
    assert_eq!(ctx.sni, "ratings.pilotfish.local");
    let (certs, _, _) = common(ctx.common_tls_context.as_ref().unwrap());
    assert_eq!(certs, ["node"]);
}

#[test]
fn client_identity_is_the_first_local_service() {
    let mut c = demo();
    // vm-b also hosts "alpha", which sorts before "reviews".
    let alpha = service(
        "alpha",
        80,
        None,
        vec![instance(Some("vm-b"), "10.0.0.12", 8000, &[])],
    );
    c.services.insert(alpha.name.clone(), alpha);
    let shared = build(c);
    let res = shared.for_proxy(&proxy("vm-b", "10.0.0.12"));
    let cluster: Cluster = decode(&res.clusters, "outbound|ratings");
    let ctx: UpstreamTlsContext = unpack(tls_any(&cluster.transport_socket));
    let (certs, _, _) = common(ctx.common_tls_context.as_ref().unwrap());
    assert_eq!(certs, ["service/alpha"]);
    assert_eq!(
        client_secret(&shared.catalog, "vm-b"),
        "service/alpha".to_string()
    );
    assert_eq!(client_secret(&shared.catalog, "vm-x"), "node");
}

#[test]
fn only_mesh_instances_get_tls() {
    let mut c = demo();
    // Mixed: one instance behind an agent, one not.
    let mixed = service(
        "mixed",
        80,
        None,
        vec![
            instance(Some("vm-b"), "10.0.0.12", 8080, &[]),
            instance(None, "10.0.0.60", 8080, &[]),
        ],
    );
    let mut grpc = service(
        "ledger",
        7000,
        None,
        vec![instance(Some("vm-c"), "10.0.0.13", 7000, &[])],
    );
    grpc.protocol = Protocol::Grpc;
    let legacy = service(
        "legacy",
        80,
        None,
        vec![instance(None, "10.0.0.61", 80, &[])],
    );
    for s in [mixed, grpc, legacy] {
        c.services.insert(s.name.clone(), s);
    }
    let shared = build(c);
    let res = shared.for_proxy(&proxy("vm-x", "10.0.0.99"));

    let m: Cluster = decode(&res.clusters, "outbound|mixed");
    assert!(m.transport_socket.is_none(), "never both");
    assert_eq!(m.transport_socket_matches.len(), 1);
    let tsm = &m.transport_socket_matches[0];
    let want = Struct {
        fields: [(
            "mesh".to_string(),
            envoy_types::pb::google::protobuf::Value {
                kind: Some(Kind::BoolValue(true)),
            },
        )]
        .into(),
    };
    assert_eq!(tsm.r#match.as_ref(), Some(&want));
    let ctx: UpstreamTlsContext = unpack(tls_any(&tsm.transport_socket));
    assert_eq!(ctx.sni, "mixed.pilotfish.local");
    let cla: ClusterLoadAssignment = decode(&res.endpoints, "outbound|mixed");
    let marks: Vec<Option<&Struct>> = cla.endpoints[0]
        .lb_endpoints
        .iter()
        .map(|e| {
            e.metadata
                .as_ref()
                .and_then(|m| m.filter_metadata.get("envoy.transport_socket_match"))
        })
        .collect();
    assert_eq!(marks, [Some(&want), None]);

    let l: Cluster = decode(&res.clusters, "outbound|legacy");
    assert!(l.transport_socket.is_none() && l.transport_socket_matches.is_empty());

    let g: Cluster = decode(&res.clusters, "outbound|ledger");
    let ctx: UpstreamTlsContext = unpack(tls_any(&g.transport_socket));
    assert_eq!(ctx.common_tls_context.unwrap().alpn_protocols, ["h2"]);
}

#[test]
fn strict_inbound_listener_picks_the_chain_by_sni() {
    let shared = build(demo_authz());
    let res = shared.for_proxy(&proxy("vm-b", "10.0.0.12"));
    assert_eq!(names(&res.listeners), ["inbound", "outbound"]);
    // No plaintext chain, so no inbound RDS: the chain's routes are inline.
    assert_eq!(names(&res.routes), ["outbound"]);
    assert!(res.clusters.contains_key("inbound|reviews"));

    let l: Listener = decode(&res.listeners, "inbound");
    assert_eq!(socket(&l.address), ("10.0.0.12".into(), 15006));
    assert_eq!(l.listener_filters.len(), 1);
    assert_eq!(
        l.listener_filters[0].name,
        "envoy.filters.listener.tls_inspector"
    );
    let Some(listener_filter::ConfigType::TypedConfig(any)) = &l.listener_filters[0].config_type
    else {
        panic!()
    };
    assert!(any.type_url.ends_with("tls_inspector.v3.TlsInspector"));
    assert_eq!(l.filter_chains.len(), 1, "strict: no raw_buffer chain");

    let c = chain(&l, "inbound|reviews");
    let m = c.filter_chain_match.as_ref().unwrap();
    assert_eq!(m.server_names, ["reviews.pilotfish.local"]);
    assert_eq!(m.transport_protocol, "tls");
    let ctx: DownstreamTlsContext = unpack(tls_any(&c.transport_socket));
    assert_eq!(ctx.require_client_certificate.map(|b| b.value), Some(true));
    let (certs, sans, roots) = common(ctx.common_tls_context.as_ref().unwrap());
    assert_eq!(certs, ["service/reviews"]);
    assert_eq!(sans.len(), 1);
    assert_eq!(sans[0].0, SanType::Uri as i32);
    assert_eq!(prefix_str(sans[0].1), "spiffe://pilotfish.local/");
    assert_eq!(roots, "roots");

    let hcm = chain_hcm(c);
    assert_eq!(hcm.stat_prefix, "inbound|reviews");
    assert_eq!(
        hcm.forward_client_cert_details,
        ForwardClientCertDetails::SanitizeSet as i32
    );
    assert!(hcm.set_current_client_cert_details.unwrap().uri);
    assert_eq!(hcm.normalize_path.map(|b| b.value), Some(true));
    assert!(hcm.merge_slashes);
    assert_eq!(
        hcm.path_with_escaped_slashes_action,
        PathWithEscapedSlashesAction::UnescapeAndRedirect as i32
    );
    let Some(RouteSpecifier::RouteConfig(rc)) = &hcm.route_specifier else {
        panic!("inline routes")
    };
    assert_eq!(rc.name, "inbound|reviews");
    let vh = vhost(rc, "reviews");
    assert_eq!(vh.domains, ["*"]);
    assert_eq!(
        route_action(&vh.routes[0]).cluster_specifier,
        Some(ClusterSpecifier::Cluster("inbound|reviews".into()))
    );
    let filters: Vec<&str> = hcm.http_filters.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        filters,
        ["pilotfish.rbac.allow", "envoy.filters.http.router"]
    );

    // The outbound side is hardened too.
    let out = hcm_of(&decode(&res.listeners, "outbound"));
    assert_eq!(out.normalize_path.map(|b| b.value), Some(true));
    assert!(out.merge_slashes);
}

#[test]
fn permissive_services_also_get_a_plaintext_chain() {
    let mut c = demo_authz();
    // vm-b hosts reviews (strict) and a permissive HTTP service with its own rules.
    let mut web = service(
        "web",
        80,
        None,
        vec![instance(Some("vm-b"), "10.0.0.12", 8081, &[])],
    );
    web.mtls = MtlsMode::Permissive;
    c.services.insert(web.name.clone(), web);
    authorize(
        &mut c,
        "web",
        vec![
            rule(
                AuthzAction::Deny,
                &[],
                &[],
                &[PathMatch::Prefix("/admin/".into())],
            ),
            rule(AuthzAction::Allow, &[], &["GET"], &[]),
        ],
    );
    let shared = build(c);
    let res = shared.for_proxy(&proxy("vm-b", "10.0.0.12"));
    let l: Listener = decode(&res.listeners, "inbound");
    let chains: Vec<&str> = l.filter_chains.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        chains,
        ["inbound|reviews", "inbound|web", "inbound|plaintext"]
    );
    // b.8: every chain sets transport_protocol, and no two chains match alike.
    let matches: Vec<_> = l
        .filter_chains
        .iter()
        .map(|c| c.filter_chain_match.clone().unwrap())
        .collect();
    assert!(matches.iter().all(|m| !m.transport_protocol.is_empty()));
    for (i, a) in matches.iter().enumerate() {
        assert!(matches[i + 1..].iter().all(|b| b != a));
    }

    let plain = chain(&l, "inbound|plaintext");
    let m = plain.filter_chain_match.as_ref().unwrap();
    assert_eq!(m.transport_protocol, "raw_buffer");
    assert!(m.server_names.is_empty());
    assert!(plain.transport_socket.is_none());
    let hcm = chain_hcm(plain);
    assert_eq!(
        hcm.forward_client_cert_details,
        ForwardClientCertDetails::Sanitize as i32
    );
    let Some(RouteSpecifier::Rds(rds)) = &hcm.route_specifier else {
        panic!()
    };
    assert_eq!(rds.route_config_name, "inbound");
    // The filters enforce nothing by themselves: each virtual host brings its rules.
    let filters: Vec<&str> = hcm.http_filters.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        filters,
        [
            "pilotfish.rbac.deny",
            "pilotfish.rbac.allow",
            "envoy.filters.http.router"
        ]
    );
    assert!(http_rbac(&hcm, "pilotfish.rbac.deny").rules.is_none());

    // Only permissive services are reachable in plaintext.
    let rc: RouteConfiguration = decode(&res.routes, "inbound");
    let vhosts: Vec<&str> = rc.virtual_hosts.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(vhosts, ["web"]);
    let vh = vhost(&rc, "web");
    assert_eq!(vh.typed_per_filter_config.len(), 1);
    let deny: RbacPerRoute = unpack(&vh.typed_per_filter_config["pilotfish.rbac.deny"]);
    let top = policy(
        deny.rbac.as_ref().unwrap().rules.as_ref().unwrap(),
        Action::Deny,
    );
    // A deny rule without `from` matches every caller, plaintext included.
    assert_eq!(ids(&ids(top)[0]).len(), 1, "only the path condition");
    assert_eq!(vh.routes[0].typed_per_filter_config.len(), 1);
    let allow: RbacPerRoute = unpack(&vh.routes[0].typed_per_filter_config["pilotfish.rbac.allow"]);
    let top = policy(
        allow.rbac.as_ref().unwrap().rules.as_ref().unwrap(),
        Action::Allow,
    );
    // An allow rule without `from` still needs an authenticated peer: fails closed on plaintext.
    assert_eq!(principal_name(&ids(&ids(top)[0])[0]), None);
}

#[test]
fn allow_rule_becomes_one_rbac_policy() {
    let shared = build(demo_authz());
    let res = shared.for_proxy(&proxy("vm-b", "10.0.0.12"));
    let l: Listener = decode(&res.listeners, "inbound");
    let hcm = chain_hcm(chain(&l, "inbound|reviews"));
    let rbac = http_rbac(&hcm, "pilotfish.rbac.allow");
    let top = policy(rbac.rules.as_ref().unwrap(), Action::Allow);
    let rules = ids(top);
    assert_eq!(rules.len(), 1);
    assert!(is_and(&rules[0]));
    let conditions = ids(&rules[0]);
    assert_eq!(conditions.len(), 3, "from, methods, paths");

    // from: or_ids over the sources' exact SPIFFE IDs.
    assert!(is_or(&conditions[0]));
    let from: Vec<Option<&str>> = ids(&conditions[0]).iter().map(principal_name).collect();
    assert_eq!(from, [Some("spiffe://pilotfish.local/service/productpage")]);

    // methods: or_ids over ":method" exact.
    let methods = ids(&conditions[1]);
    assert_eq!(methods.len(), 1);
    let Some(principal::Identifier::Header(h)) = &methods[0].identifier else {
        panic!()
    };
    assert_eq!(h.name, ":method");
    let Some(HeaderMatchSpecifier::StringMatch(m)) = &h.header_match_specifier else {
        panic!()
    };
    assert_eq!(exact_str(m), "GET");

    // paths: or_ids over url_path, "/reviews/*" as prefix "/reviews/".
    let paths = ids(&conditions[2]);
    let Some(principal::Identifier::UrlPath(p)) = &paths[0].identifier else {
        panic!()
    };
    let Some(path_matcher::Rule::Path(m)) = &p.rule else {
        panic!()
    };
    assert_eq!(prefix_str(m), "/reviews/");
}

#[test]
fn deny_rules_come_first_and_fail_closed() {
    let mut c = demo_authz();
    authorize(
        &mut c,
        "reviews",
        vec![
            rule(AuthzAction::Allow, &["productpage"], &[], &[]),
            rule(
                AuthzAction::Deny,
                &["ratings", "productpage"],
                &["DELETE", "PUT"],
                &[PathMatch::Exact("/admin".into())],
            ),
        ],
    );
    let shared = build(c);
    let res = shared.for_proxy(&proxy("vm-b", "10.0.0.12"));
    let l: Listener = decode(&res.listeners, "inbound");
    let hcm = chain_hcm(chain(&l, "inbound|reviews"));
    let filters: Vec<&str> = hcm.http_filters.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        filters,
        [
            "pilotfish.rbac.deny",
            "pilotfish.rbac.allow",
            "envoy.filters.http.router"
        ]
    );
    let deny = http_rbac(&hcm, "pilotfish.rbac.deny");
    let top = policy(deny.rules.as_ref().unwrap(), Action::Deny);
    let conditions = ids(&ids(top)[0]);
    let from = ids(&conditions[0]);
    assert_eq!(from.len(), 3);
    assert_eq!(
        principal_name(&from[0]),
        Some("spiffe://pilotfish.local/service/ratings")
    );
    // ... or anyone who is not authenticated.
    let Some(principal::Identifier::NotId(not)) = &from[2].identifier else {
        panic!("{:?}", from[2])
    };
    assert_eq!(principal_name(not), None);
    assert_eq!(ids(&conditions[1]).len(), 2);
    let Some(principal::Identifier::UrlPath(p)) = &ids(&conditions[2])[0].identifier else {
        panic!()
    };
    let Some(path_matcher::Rule::Path(m)) = &p.rule else {
        panic!()
    };
    assert_eq!(exact_str(m), "/admin");

    let allow = http_rbac(&hcm, "pilotfish.rbac.allow");
    let top = policy(allow.rules.as_ref().unwrap(), Action::Allow);
    assert_eq!(ids(&ids(top)[0]).len(), 1, "from only");
}

#[test]
fn tcp_services_get_an_sni_chain_with_network_rbac() {
    let mut c = demo();
    let mut db = service(
        "db",
        5432,
        None,
        vec![instance(Some("vm-b"), "10.0.0.12", 5432, &[])],
    );
    db.protocol = Protocol::Tcp;
    db.mtls = MtlsMode::Permissive; // plaintext TCP cannot name its service: TLS only
    c.services.insert(db.name.clone(), db);
    authorize(
        &mut c,
        "db",
        vec![rule(AuthzAction::Allow, &["reviews"], &[], &[])],
    );
    let shared = build(c);
    let res = shared.for_proxy(&proxy("vm-b", "10.0.0.12"));
    let inbound: Cluster = decode(&res.clusters, "inbound|db");
    assert!(inbound.transport_socket.is_none(), "the app is local");
    let l: Listener = decode(&res.listeners, "inbound");
    let chains: Vec<&str> = l.filter_chains.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(chains, ["inbound|db", "inbound|reviews"]);
    let c = chain(&l, "inbound|db");
    assert_eq!(
        c.filter_chain_match.as_ref().unwrap().server_names,
        ["db.pilotfish.local"]
    );
    let names: Vec<&str> = c.filters.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        names,
        ["pilotfish.rbac.allow", "envoy.filters.network.tcp_proxy"]
    );
    let Some(filter::ConfigType::TypedConfig(any)) = &c.filters[0].config_type else {
        panic!()
    };
    let rbac: NetworkRbac = unpack(any);
    assert!(!rbac.stat_prefix.is_empty());
    let top = policy(rbac.rules.as_ref().unwrap(), Action::Allow);
    let from = ids(&ids(&ids(top)[0])[0]);
    assert_eq!(
        principal_name(&from[0]),
        Some("spiffe://pilotfish.local/service/reviews")
    );
    let Some(filter::ConfigType::TypedConfig(any)) = &c.filters[1].config_type else {
        panic!()
    };
    let tcp: TcpProxy = unpack(any);
    assert_eq!(
        tcp.cluster_specifier,
        Some(tcp_proxy::ClusterSpecifier::Cluster("inbound|db".into()))
    );
    // The outbound side reaches it with TLS and its SNI.
    let out = shared.for_proxy(&proxy("vm-x", "10.0.0.99"));
    let cluster: Cluster = decode(&out.clusters, "outbound|db");
    let ctx: UpstreamTlsContext = unpack(tls_any(&cluster.transport_socket));
    assert_eq!(ctx.sni, "db.pilotfish.local");
}

#[test]
fn without_mtls_the_output_ignores_the_new_settings() {
    // Permissive mode and authorizations change nothing in an insecure mesh.
    let mut c = demo_authz();
    if let Some(s) = c.services.get_mut("ratings") {
        s.mtls = MtlsMode::Permissive;
    }
    let plain = Shared::build(Arc::new(demo()));
    let with = Shared::build_with(Arc::new(c), Arc::new(Settings::default()));
    for p in [
        proxy("vm-a", "10.0.0.11"),
        proxy("vm-b", "10.0.0.12"),
        proxy("vm-d", "10.0.0.14"),
    ] {
        let a = plain.for_proxy(&p);
        let b = with.for_proxy(&p);
        for (x, y) in [
            (&a.clusters, &b.clusters),
            (&a.endpoints, &b.endpoints),
            (&a.listeners, &b.listeners),
            (&a.routes, &b.routes),
        ] {
            let v = |m: &ResourceMap| {
                m.values()
                    .map(|r| (r.name.clone(), r.version.clone()))
                    .collect::<Vec<_>>()
            };
            assert_eq!(v(x), v(y), "{}", p.node);
        }
    }
}

#[test]
fn mtls_translation_is_deterministic() {
    let mut c = demo_authz();
    authorize(
        &mut c,
        "ratings",
        vec![
            rule(
                AuthzAction::Deny,
                &["productpage", "reviews"],
                &["POST", "PUT", "DELETE"],
                &[
                    PathMatch::Exact("/a".into()),
                    PathMatch::Prefix("/b/".into()),
                ],
            ),
            rule(AuthzAction::Allow, &["reviews"], &[], &[]),
        ],
    );
    if let Some(s) = c.services.get_mut("ratings") {
        s.mtls = MtlsMode::Permissive;
        s.instances.push(instance(None, "10.0.0.70", 9080, &[]));
    }
    let many: Vec<(String, String)> = (0..20)
        .map(|i| (format!("k{i}"), format!("v{i}")))
        .collect();
    for svc in c.services.values_mut() {
        for inst in &mut svc.instances {
            inst.labels.extend(many.iter().cloned());
        }
    }
    let c = Arc::new(c);
    let proxies = [
        proxy("vm-a", "10.0.0.11"),
        proxy("vm-b", "10.0.0.12"),
        proxy("vm-d", "10.0.0.14"),
        proxy("vm-x", "10.0.0.99"),
    ];
    let versions = |shared: &Shared, p: &Proxy| {
        let r = shared.for_proxy(p);
        [&r.clusters, &r.endpoints, &r.listeners, &r.routes]
            .iter()
            .flat_map(|m| m.values().map(|r| (r.name.clone(), r.version.clone())))
            .collect::<Vec<_>>()
    };
    let one = Shared::build_with(c.clone(), mtls_settings());
    for _ in 0..5 {
        let two = Shared::build_with(c.clone(), mtls_settings());
        for p in &proxies {
            assert_eq!(versions(&one, p), versions(&two, p), "{}", p.node);
        }
    }
    // The mixed cluster's endpoints keep their labels next to the transport match.
    let res = one.for_proxy(&proxies[3]);
    let cla: ClusterLoadAssignment = decode(&res.endpoints, "outbound|ratings");
    let endpoint = &cla.endpoints[0].lb_endpoints[0];
    assert_eq!(label_map(&endpoint.metadata).len(), 20);
    // With mTLS the listener differs from the insecure one; the insecure one is unchanged.
    let insecure = Shared::build(c.clone());
    assert_ne!(
        versions(&one, &proxies[1]),
        versions(&insecure, &proxies[1])
    );
}

#[test]
fn endpoint_change_with_mtls_matches_a_full_build() {
    let old = demo_authz();
    let shared = build(old.clone());
    let before: Vec<_> = ["vm-a", "vm-b", "vm-x"]
        .iter()
        .map(|n| shared.for_proxy(&proxy(n, "10.0.0.50")))
        .collect();
    let mut new = old.clone();
    if let Some(s) = new.services.get_mut("reviews") {
        s.instances[1].healthy = false;
        s.instances[1].address = "10.0.0.23".into();
    }
    let change = endpoint_change(&old, &new).expect("endpoint-only");
    let new = Arc::new(new);
    let next = shared.with_endpoints(new.clone(), &change);
    let fresh = Shared::build_with(new, mtls_settings());
    for (n, before) in ["vm-a", "vm-b", "vm-x"].iter().zip(&before) {
        let p = proxy(n, "10.0.0.50");
        let a = next.for_proxy(&p);
        let b = fresh.for_proxy(&p);
        for (x, y) in [
            (&a.clusters, &b.clusters),
            (&a.endpoints, &b.endpoints),
            (&a.listeners, &b.listeners),
        ] {
            let v = |m: &ResourceMap| {
                m.values()
                    .map(|r| (r.name.clone(), r.version.clone()))
                    .collect::<Vec<_>>()
            };
            assert_eq!(v(x), v(y), "{n}");
        }
        assert!(Arc::ptr_eq(&before.clusters, &a.clusters), "{n}");
    }
    // Moving the last instance out of the mesh changes the clusters' transport: a full change.
    let mut out = old.clone();
    if let Some(s) = out.services.get_mut("ratings") {
        s.instances[0].node = None;
    }
    assert!(endpoint_change(&old, &out).is_none());
}

//! Ingress gateways in one file: `[gateways.<name>]`, as serde sees them and as checked one
//! file at a time. The checks that need other files (do the routed services exist, do two
//! gateways bind the same address) are in [`super::validate`].
//!
//! ```toml
//! [gateways.public]
//! node = "gw-1"                 # the host whose Envoy is the entry point
//! listen = "0.0.0.0:8080"       # the address:port that Envoy binds for outside clients
//!
//! [[gateways.public.routes]]    # first match wins
//! host = "shop.example.com"     # the Host it answers; "*" (the default) = any
//! path_prefix = "/"             # default "/"
//! service = "productpage"       # a mesh service (HTTP)
//! ```

use std::net::SocketAddr;

use serde::Deserialize;
use toml::Spanned;

use super::parse::{key, Context, Pos};
use crate::model::{Gateway, GatewayRoute};

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GatewayDecl {
    pub pos: Pos,
    pub gateway: Gateway,
    /// Where `listen` is, to report two gateways on one address.
    pub listen_pos: Pos,
    /// Every `routes[].service`: (field path, service, position).
    pub service_refs: Vec<(String, String, Pos)>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGateway {
    node: Spanned<String>,
    listen: Spanned<String>,
    #[serde(default)]
    routes: Vec<Spanned<RawGatewayRoute>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGatewayRoute {
    host: Option<Spanned<String>>,
    path_prefix: Option<Spanned<String>>,
    service: Spanned<String>,
}

impl Context {
    pub(super) fn gateway(
        &mut self,
        name: Spanned<String>,
        raw: RawGateway,
    ) -> (String, GatewayDecl) {
        let path = format!("gateways.{}", key(name.get_ref()));
        self.name(&name, &path, "gateway");
        if raw.node.get_ref().trim().is_empty() {
            self.report(
                raw.node.span(),
                &format!("{path}.node"),
                "must not be empty",
            );
        }
        let listen = match raw.listen.get_ref().parse::<SocketAddr>() {
            Ok(a) if a.port() != 0 => a,
            _ => {
                self.report(
                    raw.listen.span(),
                    &format!("{path}.listen"),
                    format!(
                        "\"{}\" is not an ip:port (like 0.0.0.0:8080)",
                        raw.listen.get_ref()
                    ),
                );
                SocketAddr::from(([0, 0, 0, 0], 0))
            }
        };
        if raw.routes.is_empty() {
            self.report(
                name.span(),
                &format!("{path}.routes"),
                "a gateway needs at least one route",
            );
        }
        let mut routes = Vec::new();
        let mut service_refs = Vec::new();
        for (i, r) in raw.routes.into_iter().enumerate() {
            let field = format!("{path}.routes[{i}]");
            let r = r.into_inner();
            let host = r.host.map_or("*".to_string(), |h| {
                let ok = h.get_ref() == "*"
                    || (!h.get_ref().is_empty()
                        && h.get_ref()
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || "-.:_*".contains(c)));
                if !ok {
                    self.report(
                        h.span(),
                        &format!("{field}.host"),
                        format!("\"{}\" is not a host name", h.get_ref()),
                    );
                }
                h.into_inner().to_ascii_lowercase()
            });
            let path_prefix = r.path_prefix.map_or("/".to_string(), |p| {
                if !p.get_ref().starts_with('/') {
                    self.report(
                        p.span(),
                        &format!("{field}.path_prefix"),
                        format!("\"{}\" must start with '/'", p.get_ref()),
                    );
                }
                p.into_inner()
            });
            self.name(&r.service, &format!("{field}.service"), "service");
            service_refs.push((
                format!("{field}.service"),
                r.service.get_ref().clone(),
                self.pos(r.service.span()),
            ));
            routes.push(GatewayRoute {
                host,
                path_prefix,
                service: r.service.into_inner(),
            });
        }
        let decl = GatewayDecl {
            pos: self.pos(name.span()),
            listen_pos: self.pos(raw.listen.span()),
            gateway: Gateway {
                name: name.get_ref().clone(),
                node: raw.node.into_inner(),
                listen,
                routes,
                origin: self.origin(name.span()),
            },
            service_refs,
        };
        (name.into_inner(), decl)
    }
}

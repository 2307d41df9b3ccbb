//! The rules API on the HTTP port: list, read, create, replace and delete routes, policies and
//! authorization rules as JSON (`/v1/routes/{service}`, `/v1/policies/{service}`,
//! `/v1/authorizations/{service}`).
//!
//! The API keeps no state of its own. A write becomes one TOML file in `<state_dir>/rules.d`
//! (`routes-reviews.toml` holds `[routes.reviews]`), which the file registry watches like any
//! operator directory, so an accepted write is pushed exactly like a file edit and survives
//! restarts. Before writing, the new file is validated with
//! [`pilotfish_registries::files::check_with`]: the registry's own parser and cross-file
//! checks run over the files on disk with the new one in place, and any problem it causes is
//! answered with 400 and `file:line:column` messages. Objects declared in operators' files
//! are shown but never changed (409): the API does not fight the files operators own.
//!
//! Optimistic concurrency: an object's version is a hash of its file's content (so a hand
//! edit of a file in `rules.d` changes it too). Replacing or deleting needs
//! `If-Match: "<version>"`; writes are serialized so check-then-write is atomic.
//!
//! Access: a bearer token from `[api] token_file`, required for writes and (unless
//! `read_requires_token = false`) for reads. Without a token file the API is disabled (503),
//! unless discovery runs `insecure`, where it is open.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use pilotfish_durable as durable;
use pilotfish_registries::files::{check_with, declared, is_valid_name, Declared};
use pilotfish_registries::model::Catalog;
use pilotfish_registries::references::unresolved;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::Config;
use crate::store::{rules_key, SharedStore, StoreError, APPLY_WAIT, RULES_KEY};

pub mod metrics;

use self::metrics::RulesApiMetrics;

/// The directory under `state_dir` that the API writes and the file registry watches.
pub const RULES_DIR: &str = "rules.d";
/// Why the API answers 503 when no token file is configured.
pub const DISABLED: &str = "rules API disabled: set [api] token_file";
/// Largest request body accepted; a route or policy is a few hundred bytes.
pub const BODY_LIMIT: usize = 1 << 20;

/// The kinds of object the API manages: a URL segment, a TOML table, a file name prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Routes,
    Policies,
    Authorizations,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Routes, Kind::Policies, Kind::Authorizations];

    /// The URL segment: `/v1/<segment>/{service}`.
    pub fn segment(self) -> &'static str {
        match self {
            Kind::Routes => "routes",
            Kind::Policies => "policies",
            Kind::Authorizations => "authorizations",
        }
    }

    /// The top-level table in registry files: `[<table>.<service>]`.
    pub fn table(self) -> &'static str {
        match self {
            Kind::Routes => "routes",
            Kind::Policies => "policies",
            Kind::Authorizations => "authorization",
        }
    }

    /// The file in `rules.d` that holds one object.
    pub fn file_name(self, service: &str) -> String {
        format!("{}-{service}.toml", self.table())
    }
}

/// Who may use the API.
#[derive(Clone, PartialEq, Eq)]
pub enum Access {
    /// No token configured and not insecure (or `rules.d` cannot be created): every call is
    /// answered 503 with this reason.
    Disabled(String),
    /// Insecure mode without a token: anyone who reaches the port.
    Open,
    Token {
        token: String,
        reads_need_token: bool,
    },
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Access::Disabled(reason) => f.debug_tuple("Disabled").field(reason).finish(),
            Access::Open => f.write_str("Open"),
            Access::Token {
                reads_need_token, ..
            } => f
                .debug_struct("Token")
                .field("reads_need_token", reads_need_token)
                .finish_non_exhaustive(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RulesApiError {
    #[error("cannot read the rules API token file {}", path.display())]
    TokenFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the rules API token file {} is empty", path.display())]
    EmptyToken { path: PathBuf },
    #[error("cannot create the rules API directory {}", path.display())]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// `<state_dir>/rules.d`.
pub fn rules_dir(config: &Config) -> PathBuf {
    config.state_dir.join(RULES_DIR)
}

/// What the file registry (and `--check`) should read: the configured paths and `rules.d`.
pub fn registry_paths(config: &Config) -> Vec<PathBuf> {
    let mut paths = config.registry_files.clone();
    let dir = rules_dir(config);
    if !paths.contains(&dir) {
        paths.push(dir);
    }
    paths
}

/// [`registry_paths`] for `--check`: without `rules.d` while discovery has not created it, so
/// checking a fresh install does not warn about it.
pub fn check_paths(config: &Config) -> Vec<PathBuf> {
    let dir = rules_dir(config);
    let mut paths = registry_paths(config);
    paths.retain(|p| *p != dir || p.exists());
    paths
}

/// The rules API: see the module comment.
#[derive(Debug)]
pub struct RulesApi {
    dir: PathBuf,
    /// Every registry path, `dir` included.
    paths: Vec<PathBuf>,
    access: Access,
    /// Held across check-then-write, so two writes cannot both pass a check against the same
    /// state. A std mutex: it is only taken on the blocking pool.
    writes: Mutex<()>,
    /// The merged catalog (files and Consul): a write for a service that no source declares is
    /// refused, since nothing would come of it. `None` checks the files alone.
    catalog: Option<watch::Receiver<Arc<Catalog>>>,
    metrics: RulesApiMetrics,
    /// `[store.consul]`: objects live in Consul KV (`rules/<file>`), written with `?cas=`;
    /// `dir` is this replica's mirror of them.
    store: Option<Arc<SharedStore>>,
}

impl RulesApi {
    /// Reads the token file and creates `rules.d` (0700). Blocking; logs how the API is
    /// reachable.
    pub fn from_config(config: &Config) -> Result<RulesApi, RulesApiError> {
        let access = match &config.api.token_file {
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|source| RulesApiError::TokenFile {
                        path: path.clone(),
                        source,
                    })?;
                let token = text.trim();
                if token.is_empty() {
                    return Err(RulesApiError::EmptyToken { path: path.clone() });
                }
                Access::Token {
                    token: token.to_string(),
                    reads_need_token: config.api.read_requires_token,
                }
            }
            None if config.insecure => {
                warn!(
                    http = %config.http,
                    "INSECURE MODE: the rules API on the HTTP port is open; anyone who reaches \
                     it can change routes and policies. Set [api] token_file to require a token."
                );
                Access::Open
            }
            None => {
                info!("rules API disabled: set [api] token_file to enable it");
                Access::Disabled(DISABLED.to_string())
            }
        };
        match RulesApi::new(rules_dir(config), registry_paths(config), access) {
            // Nobody asked for the API (no token file), and discovery ran without a writable
            // state_dir before it existed: keep running, and say why the API is off.
            Err(e) if config.api.token_file.is_none() => {
                let reason = format!("rules API disabled: {}", crate::error_chain(&e));
                warn!("{reason}");
                Ok(RulesApi {
                    dir: rules_dir(config),
                    paths: registry_paths(config),
                    access: Access::Disabled(reason),
                    writes: Mutex::new(()),
                    catalog: None,
                    metrics: RulesApiMetrics::default(),
                    store: None,
                })
            }
            result => result,
        }
    }

    /// An API writing into `dir` (created 0700 if missing) and validating against `paths`,
    /// which should include `dir`.
    pub fn new(
        dir: PathBuf,
        paths: Vec<PathBuf>,
        access: Access,
    ) -> Result<RulesApi, RulesApiError> {
        durable::create_dir_all(&dir, durable::PRIVATE_DIR_MODE).map_err(|source| {
            RulesApiError::Dir {
                path: dir.clone(),
                source,
            }
        })?;
        Ok(RulesApi {
            dir,
            paths,
            access,
            writes: Mutex::new(()),
            catalog: None,
            metrics: RulesApiMetrics::default(),
            store: None,
        })
    }

    /// Keep objects in the replicas' shared store from now on.
    pub fn with_store(mut self, store: Arc<SharedStore>) -> RulesApi {
        self.store = Some(store);
        self
    }

    /// What the API counts; the HTTP server registers it.
    pub fn metrics(&self) -> &RulesApiMetrics {
        &self.metrics
    }

    /// The registry paths this API validates against (`rules.d` included).
    pub fn registry_paths(&self) -> &[PathBuf] {
        &self.paths
    }

    /// `/v1/<kind>` and `/v1/<kind>/{service}` for every kind, ready to merge into the HTTP
    /// server's router.
    pub fn router(self: Arc<Self>) -> Router {
        let mut router = Router::new();
        for kind in Kind::ALL {
            router = router
                .route(
                    &format!("/v1/{}", kind.segment()),
                    get(
                        move |State(api): State<Arc<RulesApi>>, headers: HeaderMap| {
                            handle(api, headers, kind, None, Op::List)
                        },
                    ),
                )
                .route(
                    &format!("/v1/{}/{{service}}", kind.segment()),
                    get(
                        move |State(api): State<Arc<RulesApi>>,
                              UrlPath(service): UrlPath<String>,
                              headers: HeaderMap| {
                            handle(api, headers, kind, Some(service), Op::Get)
                        },
                    )
                    .put(
                        move |State(api): State<Arc<RulesApi>>,
                              UrlPath(service): UrlPath<String>,
                              headers: HeaderMap,
                              body: Bytes| {
                            handle(api, headers, kind, Some(service), Op::Put(body))
                        },
                    )
                    .delete(
                        move |State(api): State<Arc<RulesApi>>,
                              UrlPath(service): UrlPath<String>,
                              headers: HeaderMap| {
                            handle(api, headers, kind, Some(service), Op::Delete)
                        },
                    ),
                );
        }
        router
            .layer(DefaultBodyLimit::max(BODY_LIMIT))
            .with_state(self)
    }

    pub(crate) fn authorize(&self, headers: &HeaderMap, write: bool) -> Result<(), ApiError> {
        let (token, reads_need_token) = match &self.access {
            Access::Disabled(reason) => {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    reason.clone(),
                ))
            }
            Access::Open => return Ok(()),
            Access::Token {
                token,
                reads_need_token,
            } => (token, *reads_need_token),
        };
        if !write && !reads_need_token {
            return Ok(());
        }
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim());
        match presented {
            None => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "this call needs Authorization: Bearer <token> ([api] token_file)",
            )),
            Some(t) if tokens_match(t, token) => Ok(()),
            // RFC 6750: a token that is not valid is 401 with a challenge, like a missing one.
            Some(_) => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "the bearer token is not valid ([api] token_file)",
            )),
        }
    }

    fn own_file(&self, kind: Kind, service: &str) -> PathBuf {
        self.dir.join(kind.file_name(service))
    }

    fn object(&self, kind: Kind, d: &Declared) -> Object {
        Object {
            service: d.service.clone(),
            version: version_of(&d.content),
            source: d.file.display().to_string(),
            managed: d.file == self.own_file(kind, &d.service),
            spec: toml_to_json(&d.table),
        }
    }

    fn list(&self, kind: Kind) -> Response {
        let items: Vec<Object> = declared(&self.paths, kind.table())
            .iter()
            .map(|d| self.object(kind, d))
            .collect();
        Json(List { items }).into_response()
    }

    fn get(&self, kind: Kind, service: &str) -> Result<Response, ApiError> {
        let found = declared(&self.paths, kind.table());
        let own = self.own_file(kind, service);
        // The API's own file first: it is the one a client can change.
        let object = found
            .iter()
            .filter(|d| d.service == service)
            .min_by_key(|d| d.file != own)
            .map(|d| self.object(kind, d))
            .ok_or_else(|| not_found(kind, service))?;
        Ok(with_etag(StatusCode::OK, object))
    }

    fn put(
        &self,
        kind: Kind,
        service: &str,
        pre: Precondition,
        body: &[u8],
    ) -> Result<Response, ApiError> {
        let spec: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("the body is not JSON: {e}"),
            )
        })?;
        let table = json_to_table(kind, service, &spec).map_err(ApiError::bad_request)?;
        let mut content = render(kind, service, &table);
        if self.store.is_some() {
            // Consul skips a write whose bytes equal the stored ones without checking `cas`
            // against them, so two replicas writing the same object at the same index would
            // both be told they won. A write is unique, and so is its version.
            content.push_str(&format!("\n# write {:016x}\n", rand::random::<u64>()));
        }
        let file = self.own_file(kind, service);

        let _guard = self.writes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(owner) = declared(&self.paths, kind.table())
            .into_iter()
            .find(|d| d.service == service && d.file != file)
        {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "{}.{service} is declared in {}, a file the rules API does not manage; change it there",
                    kind.table(),
                    owner.file.display()
                ),
            ));
        }
        let (current, cas) = self.current(kind, service)?;
        let created = allowed(
            kind,
            service,
            current.as_deref().map(version_of),
            &pre,
            false,
        )?;
        let catalog = self.validate(&file, Some(content.clone()))?;
        self.known(&file, &catalog)?;
        self.commit(kind, service, Some(&content), cas)?;
        let version = version_of(&content);
        info!(kind = kind.segment(), service, %version, file = %file.display(), "rules API: wrote");
        let object = Object {
            service: service.to_string(),
            version,
            source: file.display().to_string(),
            managed: true,
            spec: toml_to_json(&toml::Value::Table(table)),
        };
        let status = if created {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        };
        let mut response = with_etag(status, object);
        if created {
            let location = format!("/v1/{}/{service}", kind.segment());
            if let Ok(v) = HeaderValue::from_str(&location) {
                response.headers_mut().insert(header::LOCATION, v);
            }
        }
        Ok(response)
    }

    fn delete(&self, kind: Kind, service: &str, pre: Precondition) -> Result<Response, ApiError> {
        let file = self.own_file(kind, service);
        let _guard = self.writes.lock().unwrap_or_else(|p| p.into_inner());
        let (current, cas) = self.current(kind, service)?;
        let Some(current) = current else {
            if let Some(owner) = declared(&self.paths, kind.table())
                .into_iter()
                .find(|d| d.service == service)
            {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    format!(
                        "{}.{service} is declared in {}, a file the rules API does not manage; delete it there",
                        kind.table(),
                        owner.file.display()
                    ),
                ));
            }
            return Err(not_found(kind, service));
        };
        allowed(kind, service, Some(version_of(&current)), &pre, true)?;
        self.validate(&file, None)?;
        self.commit(kind, service, None, cas)?;
        info!(kind = kind.segment(), service, file = %file.display(), "rules API: deleted");
        Ok(StatusCode::NO_CONTENT.into_response())
    }

    /// The object's current content (`None`: the API holds none) and what a compare-and-set
    /// must name: the Consul `ModifyIndex` with a shared store (0 when absent), else 0.
    fn current(&self, kind: Kind, service: &str) -> Result<(Option<String>, u64), ApiError> {
        let Some(store) = &self.store else {
            return Ok((read_current(&self.own_file(kind, service))?, 0));
        };
        let rel = shared_key(kind, service);
        match store.block_on(store.get(&rel)) {
            Ok(Some(entry)) => Ok((
                Some(String::from_utf8_lossy(&entry.value).into_owned()),
                entry.modify_index,
            )),
            Ok(None) => Ok((None, 0)),
            Err(e) => Err(unavailable(&e)),
        }
    }

    /// Writes (`Some`) or removes (`None`) the object's file: in `rules.d`, or in the shared
    /// store if the object is still at `cas` (and then waits, briefly, for this replica's
    /// mirror to have it, so a client that reads back here sees its write).
    fn commit(
        &self,
        kind: Kind,
        service: &str,
        content: Option<&str>,
        cas: u64,
    ) -> Result<(), ApiError> {
        let file = self.own_file(kind, service);
        let Some(store) = &self.store else {
            // Temp file (a dot name, which the registry skips), fsync, rename, fsync of the
            // directory: the registry sees the old file or the new one, never a partial one.
            return match content {
                Some(c) => durable::write_atomic(&file, c.as_bytes(), durable::SECRET_MODE)
                    .map_err(|e| {
                        ApiError::internal(format!("cannot write {}: {e}", file.display()))
                    }),
                None => durable::remove(&file).map_err(|e| {
                    ApiError::internal(format!("cannot remove {}: {e}", file.display()))
                }),
            };
        };
        let rel = shared_key(kind, service);
        let won = match content {
            Some(c) => store.block_on(store.put_if(&rel, c.as_bytes(), cas)),
            None => store.block_on(store.delete_if(&rel, cas)),
        }
        .map_err(|e| unavailable(&e))?;
        if !won {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "{}.{service} was changed through another replica meanwhile; read it again and retry",
                    kind.table()
                ),
            ));
        }
        if !store.block_on(store.wait_applied(RULES_KEY, APPLY_WAIT)) {
            warn!(
                kind = kind.segment(),
                service, "rules API: the write is in Consul but not yet in this replica's rules.d"
            );
        }
        Ok(())
    }

    /// Check writes against the merged catalog of every source from now on.
    pub fn with_catalog(mut self, catalog: watch::Receiver<Arc<Catalog>>) -> RulesApi {
        self.catalog = Some(catalog);
        self
    }

    /// 400 when the object names a service that no source declares. Files may name services
    /// declared later (a warning, see `pilotfish_registries::references`); an API write is
    /// made by a tool that can be told at once.
    /// `catalog`: the files' catalog with the write applied, as [`RulesApi::validate`] built it.
    fn known(&self, file: &Path, catalog: &Catalog) -> Result<(), ApiError> {
        let merged = self.catalog.as_ref().map(|c| Arc::clone(&c.borrow()));
        let errors: Vec<String> = unresolved(catalog)
            .into_iter()
            .filter(|u| u.origin.file == file)
            .filter(|u| {
                !merged
                    .as_ref()
                    .is_some_and(|m| m.services.contains_key(&u.service))
            })
            .map(|u| {
                format!(
                    "{}: unknown service \"{}\" (no file or Consul datacenter declares it)",
                    u.field, u.service
                )
            })
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ApiError {
                status: StatusCode::BAD_REQUEST,
                errors,
            })
        }
    }

    /// 400 with every problem the change brings: any in the API's file, and any elsewhere
    /// that the files on disk do not already have (a deleted policy breaks a route to its
    /// subsets). Problems operators' files have anyway are theirs, not this write's. The
    /// files' catalog with the change applied, when it is accepted.
    fn validate(&self, file: &Path, content: Option<String>) -> Result<Catalog, ApiError> {
        let (_, before) = check_with(&self.paths, &[]);
        let (catalog, after) = check_with(&self.paths, &[(file.to_path_buf(), content)]);
        let errors: Vec<String> = after
            .iter()
            .filter(|p| p.file == file || !before.contains(p))
            .map(ToString::to_string)
            .collect();
        if errors.is_empty() {
            Ok(catalog)
        } else {
            Err(ApiError {
                status: StatusCode::BAD_REQUEST,
                errors,
            })
        }
    }
}

enum Op {
    List,
    Get,
    Put(Bytes),
    Delete,
}

async fn handle(
    api: Arc<RulesApi>,
    headers: HeaderMap,
    kind: Kind,
    service: Option<String>,
    op: Op,
) -> Response {
    let write = matches!(op, Op::Put(_) | Op::Delete);
    let response = answer(Arc::clone(&api), headers, kind, service, op).await;
    if write {
        api.metrics.write(kind, response.status());
    }
    response
}

async fn answer(
    api: Arc<RulesApi>,
    headers: HeaderMap,
    kind: Kind,
    service: Option<String>,
    op: Op,
) -> Response {
    let write = matches!(op, Op::Put(_) | Op::Delete);
    if let Err(e) = api.authorize(&headers, write) {
        return e.into_response();
    }
    if let Some(service) = &service {
        if !is_valid_name(service) {
            return ApiError::bad_request(format!(
                "\"{service}\" is not a valid service name (lower case letters, digits, '-', '.', '_')"
            ))
            .into_response();
        }
    }
    let pre = match Precondition::from_headers(&headers) {
        Ok(pre) => pre,
        Err(e) => return e.into_response(),
    };
    // Every operation reads (and may write) files: off the async workers.
    let joined = tokio::task::spawn_blocking(move || {
        let service = service.as_deref().unwrap_or_default();
        match op {
            Op::List => Ok(api.list(kind)),
            Op::Get => api.get(kind, service),
            Op::Put(body) => api.put(kind, service, pre, &body),
            Op::Delete => api.delete(kind, service, pre),
        }
    })
    .await;
    match joined {
        Ok(Ok(response)) => response,
        Ok(Err(e)) => e.into_response(),
        Err(e) => ApiError::internal(format!("the request failed: {e}")).into_response(),
    }
}

// ---- JSON shapes ----

/// One object, as GET and a successful PUT return it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Object {
    pub service: String,
    /// A hash of the file that declares it; send it back in `If-Match`.
    pub version: String,
    /// The file that declares it.
    pub source: String,
    /// Whether the rules API manages it (it lives in `rules.d`); others are read-only here.
    pub managed: bool,
    /// The `[<kind>.<service>]` table as JSON.
    pub spec: serde_json::Value,
}

#[derive(Debug, Serialize)]
struct List {
    items: Vec<Object>,
}

/// Every error is `{"errors": ["...", ...]}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub errors: Vec<String>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            errors: vec![message.into()],
        }
    }

    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    fn internal(message: String) -> ApiError {
        warn!(error = %message, "rules API");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            Json(serde_json::json!({ "errors": self.errors })),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// The object's key in the shared store.
fn shared_key(kind: Kind, service: &str) -> String {
    rules_key(&kind.file_name(service))
        .unwrap_or_else(|| format!("{RULES_KEY}{}-{service}", kind.table()))
}

/// 503: the shared store cannot be reached; reads go on from this replica's copy.
fn unavailable(e: &StoreError) -> ApiError {
    warn!(error = %crate::error_chain(e), "rules API: write refused");
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        format!(
            "{}; writes need it, reads are served from this replica's copy",
            crate::error_chain(e)
        ),
    )
}

fn not_found(kind: Kind, service: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no {}.{service}", kind.table()),
    )
}

fn with_etag(status: StatusCode, object: Object) -> Response {
    let etag = HeaderValue::from_str(&format!("\"{}\"", object.version));
    let mut response = (status, Json(object)).into_response();
    if let Ok(etag) = etag {
        response.headers_mut().insert(header::ETAG, etag);
    }
    response
}

// ---- versions and preconditions (pure) ----

/// A short content hash: 16 hex digits of SHA-256.
pub fn version_of(content: &str) -> String {
    let digest = Sha256::digest(content.as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// What the client said about the version it expects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Precondition {
    None,
    /// `If-Match`: one of these versions (quotes removed).
    IfMatch(Vec<String>),
    /// `If-None-Match: *`: create only.
    IfNoneMatchAny,
}

impl Precondition {
    fn from_headers(headers: &HeaderMap) -> Result<Precondition, ApiError> {
        let text = |name| {
            headers
                .get(name)
                .map(|v: &HeaderValue| {
                    v.to_str()
                        .map_err(|_| ApiError::bad_request("a precondition header is not text"))
                })
                .transpose()
        };
        match (text(header::IF_MATCH)?, text(header::IF_NONE_MATCH)?) {
            (Some(_), Some(_)) => Err(ApiError::bad_request(
                "send If-Match (to replace or delete) or If-None-Match: * (to create), not both",
            )),
            (Some(m), None) => Ok(Precondition::IfMatch(
                m.split(',')
                    .map(|v| {
                        let v = v.trim();
                        let v = v.strip_prefix("W/").unwrap_or(v);
                        v.trim_matches('"').to_string()
                    })
                    .filter(|v| !v.is_empty())
                    .collect(),
            )),
            (None, Some(n)) if n.trim() == "*" => Ok(Precondition::IfNoneMatchAny),
            (None, Some(_)) => Err(ApiError::bad_request(
                "If-None-Match: only * (create only) is supported",
            )),
            (None, None) => Ok(Precondition::None),
        }
    }
}

/// Whether a write may go ahead given the object's current version (`None`: it does not
/// exist). `Ok(true)`: it creates the object. Deleting something missing is the caller's 404.
pub fn allowed(
    kind: Kind,
    service: &str,
    current: Option<String>,
    pre: &Precondition,
    deleting: bool,
) -> Result<bool, ApiError> {
    let name = format!("{}.{service}", kind.table());
    let conflict = |message: String| Err(ApiError::new(StatusCode::CONFLICT, message));
    match (current, pre) {
        (None, Precondition::IfMatch(_)) => conflict(format!(
            "{name} does not exist (any more); create it without If-Match"
        )),
        (None, _) => Ok(true),
        (Some(v), Precondition::IfMatch(wanted)) if wanted.contains(&v) => Ok(false),
        (Some(v), Precondition::IfMatch(_)) => conflict(format!(
            "{name} has changed: its version is now \"{v}\"; read it again and retry"
        )),
        (Some(v), Precondition::IfNoneMatchAny) => {
            conflict(format!("{name} already exists (version \"{v}\")"))
        }
        (Some(v), Precondition::None) => conflict(format!(
            "{name} exists (version \"{v}\"); send If-Match: \"{v}\" to {} it",
            if deleting { "delete" } else { "replace" }
        )),
    }
}

/// Compares in time independent of where the tokens differ (and of their lengths, by
/// comparing digests).
fn tokens_match(presented: &str, expected: &str) -> bool {
    let a = Sha256::digest(presented.as_bytes());
    let b = Sha256::digest(expected.as_bytes());
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

// ---- JSON <-> TOML (pure) ----

/// The request body (the object's table as JSON) as a TOML table. JSON `null` has no TOML
/// equivalent: leave the key out instead.
pub fn json_to_table(
    kind: Kind,
    service: &str,
    spec: &serde_json::Value,
) -> Result<toml::Table, String> {
    let path = format!("{}.{service}", kind.table());
    match json_to_toml(spec, &path)? {
        toml::Value::Table(t) => Ok(t),
        _ => Err(format!(
            "the body must be a JSON object: the [{path}] table"
        )),
    }
}

fn json_to_toml(value: &serde_json::Value, path: &str) -> Result<toml::Value, String> {
    use serde_json::Value as J;
    Ok(match value {
        J::Null => {
            return Err(format!(
                "{path}: null is not allowed (leave the key out instead)"
            ))
        }
        J::Bool(b) => toml::Value::Boolean(*b),
        J::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => toml::Value::Integer(i),
            (None, _) if n.is_u64() => return Err(format!("{path}: {n} is out of range")),
            (None, Some(f)) => toml::Value::Float(f),
            (None, None) => return Err(format!("{path}: {n} is not a number TOML can hold")),
        },
        J::String(s) => toml::Value::String(s.clone()),
        J::Array(items) => toml::Value::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, v)| json_to_toml(v, &format!("{path}[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        J::Object(map) => toml::Value::Table(
            map.iter()
                .map(|(k, v)| Ok((k.clone(), json_to_toml(v, &format!("{path}.{}", key(k)))?)))
                .collect::<Result<_, String>>()?,
        ),
    })
}

/// A TOML value as JSON (dates become strings, which the rules do not use anyway).
pub fn toml_to_json(value: &toml::Value) -> serde_json::Value {
    use serde_json::Value as J;
    match value {
        toml::Value::String(s) => J::String(s.clone()),
        toml::Value::Integer(i) => J::from(*i),
        toml::Value::Float(f) => serde_json::Number::from_f64(*f)
            .map(J::Number)
            .unwrap_or_else(|| J::String(f.to_string())),
        toml::Value::Boolean(b) => J::Bool(*b),
        toml::Value::Datetime(d) => J::String(d.to_string()),
        toml::Value::Array(items) => J::Array(items.iter().map(toml_to_json).collect()),
        toml::Value::Table(t) => J::Object(
            t.iter()
                .map(|(k, v)| (k.clone(), toml_to_json(v)))
                .collect::<serde_json::Map<_, _>>(),
        ),
    }
}

/// The file for one object, written the way an operator would: scalars and small tables
/// inline under `[<table>.<service>]`, each element of a list of tables (`rules`) in its own
/// `[[...]]` section, so messages point at the rule they are about.
pub fn render(kind: Kind, service: &str, spec: &toml::Table) -> String {
    let base = format!("{}.{}", kind.table(), key(service));
    let mut out = format!(
        "# Managed by the Pilotfish rules API (/v1/{segment}/{service}; pilotfish-ctl {segment} ...).\n\
         # Discovery rewrites or removes this file on API writes. A hand edit here takes effect\n\
         # like any registry file edit, and changes the version the next API write must match.\n\n\
         [{base}]\n",
        segment = kind.segment(),
    );
    let mut sections = String::new();
    for (k, v) in spec {
        match v {
            toml::Value::Array(items)
                if !items.is_empty() && items.iter().all(|i| i.is_table()) =>
            {
                for item in items.iter().filter_map(toml::Value::as_table) {
                    sections.push_str(&format!("\n[[{base}.{}]]\n", key(k)));
                    for (k2, v2) in item {
                        sections.push_str(&format!("{} = {v2}\n", key(k2)));
                    }
                }
            }
            _ => out.push_str(&format!("{} = {v}\n", key(k))),
        }
    }
    out + &sections
}

/// A TOML key: bare when it can be, else a basic string (JSON's string escapes are TOML's).
fn key(k: &str) -> String {
    let bare = !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if bare {
        k.to_string()
    } else {
        serde_json::Value::String(k.to_string()).to_string()
    }
}

// ---- files ----

fn read_current(file: &Path) -> Result<Option<String>, ApiError> {
    match std::fs::read_to_string(file) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ApiError::internal(format!(
            "cannot read {}: {e}",
            file.display()
        ))),
    }
}

#[cfg(test)]
pub(crate) mod tests;

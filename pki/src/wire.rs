//! The agent<->discovery identity service, `pilotfish.identity.v1.Identity`, on discovery's
//! gRPC port next to ADS. The messages and the tonic glue are written by hand (no protoc), in
//! the shape tonic-build generates; this is the contract, equivalent to:
//!
//! ```proto
//! syntax = "proto3";
//! package pilotfish.identity.v1;
//!
//! service Identity {
//!   // First contact: a join token for `node` buys a node certificate. Server TLS only.
//!   rpc Enrol(EnrolRequest) returns (EnrolResponse);
//!   // With the node certificate as client certificate: renew it (service = "") or get a
//!   // certificate for a service the registry places on this node.
//!   rpc Sign(SignRequest) returns (SignResponse);
//!   // The current trust bundle (to pick up a new root without waiting for a renewal).
//!   rpc Bundle(BundleRequest) returns (BundleResponse);
//!   // The same, kept open: the current bundle and CRL at once, then again on every change
//!   // (a node revoked, the CA reloaded). Closed with PERMISSION_DENIED when the caller's node
//!   // is revoked.
//!   rpc WatchBundle(BundleRequest) returns (stream BundleResponse);
//! }
//! message EnrolRequest   { string token = 1; string node = 2; string csr_pem = 3; }
//! message EnrolResponse  { string cert_pem = 1; string chain_pem = 2; string bundle_pem = 3;
//!                          uint64 not_after_unix_secs = 4; }
//! message SignRequest    { string csr_pem = 1; string service = 2; }
//! message SignResponse   { string cert_pem = 1; string chain_pem = 2; string bundle_pem = 3;
//!                          uint64 not_after_unix_secs = 4; }
//! message BundleRequest  {}
//! message BundleResponse { string bundle_pem = 1; string crl_pem = 2; }
//! ```
//!
//! The server decodes at most [`DEFAULT_MAX_REQUEST_BYTES`] per request by default: requests
//! are a token and a CSR, and the Enrol path is reachable before authentication.

use std::marker::PhantomData;
use std::time::{SystemTime, UNIX_EPOCH};

use tonic::codegen::{
    async_trait, http, Arc, Body, BoxFuture, CompressionEncoding, Context,
    EnabledCompressionEncodings, GrpcMethod, Poll, Service, StdError,
};

use crate::ca::{CsrRejected, Issued};
use crate::tokens::TokenRejected;

/// The fully qualified service name.
pub const SERVICE_NAME: &str = "pilotfish.identity.v1.Identity";
const ENROL_PATH: &str = "/pilotfish.identity.v1.Identity/Enrol";
const SIGN_PATH: &str = "/pilotfish.identity.v1.Identity/Sign";
const BUNDLE_PATH: &str = "/pilotfish.identity.v1.Identity/Bundle";
const WATCH_BUNDLE_PATH: &str = "/pilotfish.identity.v1.Identity/WatchBundle";
/// What every refusal of a revoked node or certificate says, so the agent can tell it from
/// other refusals ([`is_revoked`]).
pub const REVOKED_MARK: &str = "is revoked";

/// Whether discovery refused the call because the caller's node or certificate is revoked.
pub fn is_revoked(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::PermissionDenied && status.message().contains(REVOKED_MARK)
}
/// Default cap on a decoded request.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 64 * 1024;

#[derive(Clone, PartialEq, prost::Message)]
pub struct EnrolRequest {
    /// The join token, `pft1.<id>.<secret>`.
    #[prost(string, tag = "1")]
    pub token: String,
    /// The node the host says it is; must match the token's.
    #[prost(string, tag = "2")]
    pub node: String,
    /// A CSR for `spiffe://<td>/node/<node>`, PEM.
    #[prost(string, tag = "3")]
    pub csr_pem: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct EnrolResponse {
    #[prost(string, tag = "1")]
    pub cert_pem: String,
    #[prost(string, tag = "2")]
    pub chain_pem: String,
    #[prost(string, tag = "3")]
    pub bundle_pem: String,
    #[prost(uint64, tag = "4")]
    pub not_after_unix_secs: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SignRequest {
    /// A CSR for the ID wanted, PEM.
    #[prost(string, tag = "1")]
    pub csr_pem: String,
    /// The service to get a certificate for; empty renews the caller's node certificate.
    #[prost(string, tag = "2")]
    pub service: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SignResponse {
    #[prost(string, tag = "1")]
    pub cert_pem: String,
    #[prost(string, tag = "2")]
    pub chain_pem: String,
    #[prost(string, tag = "3")]
    pub bundle_pem: String,
    #[prost(uint64, tag = "4")]
    pub not_after_unix_secs: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct BundleRequest {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct BundleResponse {
    #[prost(string, tag = "1")]
    pub bundle_pem: String,
    /// CRLs of the signing CA, PEM; empty while no certificate is revoked.
    #[prost(string, tag = "2")]
    pub crl_pem: String,
}

/// What [`Identity::watch_bundle`] answers with.
pub type BundleStream = tonic::codegen::BoxStream<BundleResponse>;

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl From<Issued> for SignResponse {
    fn from(i: Issued) -> Self {
        Self {
            not_after_unix_secs: unix_secs(i.not_after),
            cert_pem: i.cert_pem,
            chain_pem: i.chain_pem,
            bundle_pem: i.bundle_pem,
        }
    }
}

impl From<Issued> for EnrolResponse {
    fn from(i: Issued) -> Self {
        Self {
            not_after_unix_secs: unix_secs(i.not_after),
            cert_pem: i.cert_pem,
            chain_pem: i.chain_pem,
            bundle_pem: i.bundle_pem,
        }
    }
}

/// A refused CSR is the caller's problem (InvalidArgument) unless it asked for an identity it
/// may not hold (PermissionDenied); a signing failure is ours (Internal, no detail).
impl From<CsrRejected> for tonic::Status {
    fn from(e: CsrRejected) -> Self {
        match e {
            CsrRejected::Signing(_) => tonic::Status::internal("the CA failed to sign"),
            CsrRejected::SanNotAllowed { .. }
            | CsrRejected::ForeignTrustDomain { .. }
            | CsrRejected::RoleNotIssuable(_) => tonic::Status::permission_denied(e.to_string()),
            _ => tonic::Status::invalid_argument(e.to_string()),
        }
    }
}

/// A refused token is Unauthenticated with its reason; a store failure is Internal, without
/// the path.
impl From<TokenRejected> for tonic::Status {
    fn from(e: TokenRejected) -> Self {
        match e {
            TokenRejected::Store(_) => tonic::Status::internal("the join token store failed"),
            _ => tonic::Status::unauthenticated(e.to_string()),
        }
    }
}

/// What discovery implements. Each method gets the whole request, so it can read the TLS
/// peer's certificates (`request.peer_certs()`) and authorise from them.
#[async_trait]
pub trait Identity: Send + Sync + 'static {
    async fn enrol(
        &self,
        request: tonic::Request<EnrolRequest>,
    ) -> Result<tonic::Response<EnrolResponse>, tonic::Status>;

    async fn sign(
        &self,
        request: tonic::Request<SignRequest>,
    ) -> Result<tonic::Response<SignResponse>, tonic::Status>;

    async fn bundle(
        &self,
        request: tonic::Request<BundleRequest>,
    ) -> Result<tonic::Response<BundleResponse>, tonic::Status>;

    async fn watch_bundle(
        &self,
        request: tonic::Request<BundleRequest>,
    ) -> Result<tonic::Response<BundleStream>, tonic::Status>;
}

/// The tonic service for an [`Identity`]: add it to a `tonic::transport::Server`.
#[derive(Debug)]
pub struct IdentityServer<T> {
    inner: Arc<T>,
    accept_compression_encodings: EnabledCompressionEncodings,
    send_compression_encodings: EnabledCompressionEncodings,
    max_decoding_message_size: Option<usize>,
    max_encoding_message_size: Option<usize>,
}

impl<T> IdentityServer<T> {
    pub fn new(inner: T) -> Self {
        Self::from_arc(Arc::new(inner))
    }

    pub fn from_arc(inner: Arc<T>) -> Self {
        Self {
            inner,
            accept_compression_encodings: Default::default(),
            send_compression_encodings: Default::default(),
            max_decoding_message_size: Some(DEFAULT_MAX_REQUEST_BYTES),
            max_encoding_message_size: None,
        }
    }

    /// Enable decompressing requests with the given encoding.
    #[must_use]
    pub fn accept_compressed(mut self, encoding: CompressionEncoding) -> Self {
        self.accept_compression_encodings.enable(encoding);
        self
    }

    /// Compress responses with the given encoding, if the client supports it.
    #[must_use]
    pub fn send_compressed(mut self, encoding: CompressionEncoding) -> Self {
        self.send_compression_encodings.enable(encoding);
        self
    }

    /// Limits the size of a decoded request (default [`DEFAULT_MAX_REQUEST_BYTES`]).
    #[must_use]
    pub fn max_decoding_message_size(mut self, limit: usize) -> Self {
        self.max_decoding_message_size = Some(limit);
        self
    }

    /// Limits the size of an encoded response (default: none).
    #[must_use]
    pub fn max_encoding_message_size(mut self, limit: usize) -> Self {
        self.max_encoding_message_size = Some(limit);
        self
    }
}

impl<T> Clone for IdentityServer<T> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
            accept_compression_encodings: self.accept_compression_encodings,
            send_compression_encodings: self.send_compression_encodings,
            max_decoding_message_size: self.max_decoding_message_size,
            max_encoding_message_size: self.max_encoding_message_size,
        }
    }
}

impl<T> tonic::server::NamedService for IdentityServer<T> {
    const NAME: &'static str = SERVICE_NAME;
}

/// One unary method of `T`: what tonic-build writes as a struct per method, made generic over
/// the method by a function pointer.
struct Unary<T, Req, Resp> {
    inner: Arc<T>,
    call: UnaryFn<T, Req, Resp>,
    _messages: PhantomData<fn(Req) -> Resp>,
}

type UnaryFn<T, Req, Resp> =
    fn(Arc<T>, tonic::Request<Req>) -> BoxFuture<tonic::Response<Resp>, tonic::Status>;

impl<T, Req, Resp> tonic::server::UnaryService<Req> for Unary<T, Req, Resp> {
    type Response = Resp;
    type Future = BoxFuture<tonic::Response<Resp>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<Req>) -> Self::Future {
        (self.call)(Arc::clone(&self.inner), request)
    }
}

/// `WatchBundle`, the one server-streaming method.
struct WatchBundle<T> {
    inner: Arc<T>,
}

impl<T: Identity> tonic::server::ServerStreamingService<BundleRequest> for WatchBundle<T> {
    type Response = BundleResponse;
    type ResponseStream = BundleStream;
    type Future = BoxFuture<tonic::Response<BundleStream>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<BundleRequest>) -> Self::Future {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move { inner.watch_bundle(request).await })
    }
}

impl<T> IdentityServer<T> {
    fn serve_watch<B>(
        &self,
        req: http::Request<B>,
    ) -> BoxFuture<http::Response<tonic::body::Body>, std::convert::Infallible>
    where
        T: Identity,
        B: Body + Send + 'static,
        B::Error: Into<StdError> + Send + 'static,
    {
        let method = WatchBundle {
            inner: Arc::clone(&self.inner),
        };
        let accept = self.accept_compression_encodings;
        let send = self.send_compression_encodings;
        let max_decoding = self.max_decoding_message_size;
        let max_encoding = self.max_encoding_message_size;
        Box::pin(async move {
            let codec = tonic_prost::ProstCodec::<BundleResponse, BundleRequest>::default();
            let mut grpc = tonic::server::Grpc::new(codec)
                .apply_compression_config(accept, send)
                .apply_max_message_size_config(max_decoding, max_encoding);
            Ok(grpc.server_streaming(method, req).await)
        })
    }

    fn serve<Req, Resp, B>(
        &self,
        call: UnaryFn<T, Req, Resp>,
        req: http::Request<B>,
    ) -> BoxFuture<http::Response<tonic::body::Body>, std::convert::Infallible>
    where
        T: Send + Sync + 'static,
        Req: prost::Message + Default + Send + 'static,
        Resp: prost::Message + Send + 'static,
        B: Body + Send + 'static,
        B::Error: Into<StdError> + Send + 'static,
    {
        let method = Unary {
            inner: Arc::clone(&self.inner),
            call,
            _messages: PhantomData,
        };
        let accept = self.accept_compression_encodings;
        let send = self.send_compression_encodings;
        let max_decoding = self.max_decoding_message_size;
        let max_encoding = self.max_encoding_message_size;
        Box::pin(async move {
            let codec = tonic_prost::ProstCodec::<Resp, Req>::default();
            let mut grpc = tonic::server::Grpc::new(codec)
                .apply_compression_config(accept, send)
                .apply_max_message_size_config(max_decoding, max_encoding);
            Ok(grpc.unary(method, req).await)
        })
    }
}

impl<T, B> Service<http::Request<B>> for IdentityServer<T>
where
    T: Identity,
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        match req.uri().path() {
            ENROL_PATH => self.serve(
                |inner: Arc<T>, r| Box::pin(async move { inner.enrol(r).await }),
                req,
            ),
            SIGN_PATH => self.serve(
                |inner: Arc<T>, r| Box::pin(async move { inner.sign(r).await }),
                req,
            ),
            BUNDLE_PATH => self.serve(
                |inner: Arc<T>, r| Box::pin(async move { inner.bundle(r).await }),
                req,
            ),
            WATCH_BUNDLE_PATH => self.serve_watch(req),
            _ => Box::pin(async move {
                let mut response = http::Response::new(tonic::body::Body::default());
                let headers = response.headers_mut();
                headers.insert(
                    tonic::Status::GRPC_STATUS,
                    (tonic::Code::Unimplemented as i32).into(),
                );
                headers.insert(
                    http::header::CONTENT_TYPE,
                    tonic::metadata::GRPC_CONTENT_TYPE,
                );
                Ok(response)
            }),
        }
    }
}

/// The agent's client. Over `tonic::transport::Channel` in production (with TLS configured on
/// the endpoint), or any gRPC service in tests.
#[derive(Debug, Clone)]
pub struct IdentityClient<T> {
    inner: tonic::client::Grpc<T>,
}

impl IdentityClient<tonic::transport::Channel> {
    /// Connects to `dst` (for TLS, build the `Endpoint` with `tls_config` and use `new`).
    pub async fn connect<D>(dst: D) -> Result<Self, tonic::transport::Error>
    where
        D: TryInto<tonic::transport::Endpoint>,
        D::Error: Into<StdError>,
    {
        let conn = tonic::transport::Endpoint::new(dst)?.connect().await?;
        Ok(Self::new(conn))
    }
}

impl<T> IdentityClient<T>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<StdError>,
    T::ResponseBody: Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <T::ResponseBody as Body>::Error: Into<StdError> + Send,
{
    pub fn new(inner: T) -> Self {
        Self {
            inner: tonic::client::Grpc::new(inner),
        }
    }

    /// Limits the size of a decoded response (default 4 MiB).
    #[must_use]
    pub fn max_decoding_message_size(mut self, limit: usize) -> Self {
        self.inner = self.inner.max_decoding_message_size(limit);
        self
    }

    pub async fn enrol(
        &mut self,
        request: impl tonic::IntoRequest<EnrolRequest>,
    ) -> Result<tonic::Response<EnrolResponse>, tonic::Status> {
        self.unary(request.into_request(), ENROL_PATH, "Enrol")
            .await
    }

    pub async fn sign(
        &mut self,
        request: impl tonic::IntoRequest<SignRequest>,
    ) -> Result<tonic::Response<SignResponse>, tonic::Status> {
        self.unary(request.into_request(), SIGN_PATH, "Sign").await
    }

    pub async fn bundle(
        &mut self,
        request: impl tonic::IntoRequest<BundleRequest>,
    ) -> Result<tonic::Response<BundleResponse>, tonic::Status> {
        self.unary(request.into_request(), BUNDLE_PATH, "Bundle")
            .await
    }

    /// Opens `WatchBundle`: the first message is the current bundle and CRL.
    pub async fn watch_bundle(
        &mut self,
        request: impl tonic::IntoRequest<BundleRequest>,
    ) -> Result<tonic::Response<tonic::codec::Streaming<BundleResponse>>, tonic::Status> {
        let request = ready(
            &mut self.inner,
            request.into_request(),
            SERVICE_NAME,
            "WatchBundle",
        )
        .await?;
        let codec = tonic_prost::ProstCodec::<BundleRequest, BundleResponse>::default();
        self.inner
            .server_streaming(
                request,
                http::uri::PathAndQuery::from_static(WATCH_BUNDLE_PATH),
                codec,
            )
            .await
    }

    async fn unary<Req, Resp>(
        &mut self,
        request: tonic::Request<Req>,
        path: &'static str,
        method: &'static str,
    ) -> Result<tonic::Response<Resp>, tonic::Status>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        let request = ready(&mut self.inner, request, SERVICE_NAME, method).await?;
        let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
        self.inner
            .unary(request, http::uri::PathAndQuery::from_static(path), codec)
            .await
    }
}

/// What every hand-written client call does first: waits until the channel can take a call,
/// and names the call (`service`/`method`) in the request's extensions, as generated clients do.
pub(crate) async fn ready<T, M>(
    inner: &mut tonic::client::Grpc<T>,
    mut request: tonic::Request<M>,
    service: &'static str,
    method: &'static str,
) -> Result<tonic::Request<M>, tonic::Status>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<StdError>,
    T::ResponseBody: Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <T::ResponseBody as Body>::Error: Into<StdError> + Send,
{
    inner
        .ready()
        .await
        .map_err(|e| tonic::Status::unknown(format!("Service was not ready: {}", e.into())))?;
    request
        .extensions_mut()
        .insert(GrpcMethod::new(service, method));
    Ok(request)
}

pub mod ads;
pub mod host;

#[cfg(test)]
mod tests;

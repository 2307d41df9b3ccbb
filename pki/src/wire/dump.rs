//! The agent<->discovery config-dump channel, `pilotfish.debug.v1.ProxyDebug`, on discovery's
//! gRPC port next to ADS: how `pilotfish-ctl proxy-config` sees what a host's Envoy holds
//! without a new open port on the host (Envoy's admin stays on loopback). Written by hand in
//! the shape tonic-build generates, like [`super`]; the contract is equivalent to:
//!
//! ```proto
//! syntax = "proto3";
//! package pilotfish.debug.v1;
//!
//! service ProxyDebug {
//!   // Opened by the agent (secure mode: with its node certificate) and kept open. The agent's
//!   // first message (id 0) names its node; then discovery sends a DumpRequest whenever an
//!   // operator asks for this host's config, and the agent answers each with the same id.
//!   rpc Attach(stream DumpReply) returns (stream DumpRequest);
//! }
//! message DumpRequest { uint64 id = 1; repeated string types = 2; }
//! message DumpReply   { uint64 id = 1; string node = 2; string config_dump_json = 3;
//!                       string error = 4; }
//! ```
//!
//! `types` are `clusters`, `endpoints`, `listeners`, `routes`, `secrets` (empty: all of them).
//! The dump is Envoy's `/config_dump` JSON with those sections only, private keys redacted.

use std::sync::Arc;

use tonic::codegen::{
    async_trait, http, Body, BoxFuture, BoxStream, Context, GrpcMethod, Poll, Service, StdError,
};

pub const SERVICE_NAME: &str = "pilotfish.debug.v1.ProxyDebug";
const ATTACH_PATH: &str = "/pilotfish.debug.v1.ProxyDebug/Attach";
/// Largest dump discovery takes (a thousand services' clusters, routes and endpoints are a
/// few MB of JSON).
pub const MAX_DUMP_BYTES: usize = 64 * 1024 * 1024;

#[derive(Clone, PartialEq, prost::Message)]
pub struct DumpRequest {
    /// Answered by the reply with the same id; never 0.
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// Sections wanted (`clusters`, `endpoints`, `listeners`, `routes`, `secrets`); empty: all.
    #[prost(string, repeated, tag = "2")]
    pub types: Vec<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct DumpReply {
    /// The request answered; 0 for the agent's hello.
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// The agent's node (the hello carries it; the certificate decides in secure mode).
    #[prost(string, tag = "2")]
    pub node: String,
    /// Envoy's config dump, as JSON.
    #[prost(string, tag = "3")]
    pub config_dump_json: String,
    /// Why there is no dump (Envoy down, its admin did not answer).
    #[prost(string, tag = "4")]
    pub error: String,
}

/// What discovery implements.
#[async_trait]
pub trait ProxyDebug: Send + Sync + 'static {
    async fn attach(
        &self,
        request: tonic::Request<tonic::Streaming<DumpReply>>,
    ) -> Result<tonic::Response<BoxStream<DumpRequest>>, tonic::Status>;
}

/// The tonic service for a [`ProxyDebug`]: add it to a `tonic::transport::Server`.
#[derive(Debug)]
pub struct ProxyDebugServer<T> {
    inner: Arc<T>,
}

impl<T> ProxyDebugServer<T> {
    pub fn new(inner: T) -> Self {
        ProxyDebugServer {
            inner: Arc::new(inner),
        }
    }
}

impl<T> Clone for ProxyDebugServer<T> {
    fn clone(&self) -> Self {
        ProxyDebugServer {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<T> tonic::server::NamedService for ProxyDebugServer<T> {
    const NAME: &'static str = SERVICE_NAME;
}

struct Attach<T> {
    inner: Arc<T>,
}

impl<T: ProxyDebug> tonic::server::StreamingService<DumpReply> for Attach<T> {
    type Response = DumpRequest;
    type ResponseStream = BoxStream<DumpRequest>;
    type Future = BoxFuture<tonic::Response<Self::ResponseStream>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<tonic::Streaming<DumpReply>>) -> Self::Future {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move { inner.attach(request).await })
    }
}

impl<T, B> Service<http::Request<B>> for ProxyDebugServer<T>
where
    T: ProxyDebug,
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
        if req.uri().path() != ATTACH_PATH {
            return Box::pin(async move {
                Ok(tonic::Status::unimplemented("no such ProxyDebug method").into_http())
            });
        }
        let method = Attach {
            inner: Arc::clone(&self.inner),
        };
        Box::pin(async move {
            let codec = tonic_prost::ProstCodec::<DumpRequest, DumpReply>::default();
            let mut grpc = tonic::server::Grpc::new(codec)
                .apply_max_message_size_config(Some(MAX_DUMP_BYTES), None);
            Ok(grpc.streaming(method, req).await)
        })
    }
}

/// The agent's client.
#[derive(Debug, Clone)]
pub struct ProxyDebugClient<T> {
    inner: tonic::client::Grpc<T>,
}

impl<T> ProxyDebugClient<T>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<StdError>,
    T::ResponseBody: Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <T::ResponseBody as Body>::Error: Into<StdError> + Send,
{
    pub fn new(inner: T) -> Self {
        ProxyDebugClient {
            inner: tonic::client::Grpc::new(inner).max_encoding_message_size(MAX_DUMP_BYTES),
        }
    }

    /// Opens `Attach`: `replies` goes up (the hello first), requests come down.
    pub async fn attach(
        &mut self,
        replies: impl tonic::IntoStreamingRequest<Message = DumpReply>,
    ) -> Result<tonic::Response<tonic::codec::Streaming<DumpRequest>>, tonic::Status> {
        self.inner
            .ready()
            .await
            .map_err(|e| tonic::Status::unknown(format!("Service was not ready: {}", e.into())))?;
        let codec = tonic_prost::ProstCodec::<DumpReply, DumpRequest>::default();
        let mut request = replies.into_streaming_request();
        request
            .extensions_mut()
            .insert(GrpcMethod::new(SERVICE_NAME, "Attach"));
        self.inner
            .streaming(
                request,
                http::uri::PathAndQuery::from_static(ATTACH_PATH),
                codec,
            )
            .await
    }
}

//! The agent<->discovery host service, `pilotfish.host.v1.Host`, on discovery's gRPC port next
//! to ADS: how `pilotfish-ctl proxy-config` sees what a host's Envoy holds without a new open
//! port on the host (Envoy's admin stays on loopback), and how a stopping host tells discovery
//! it is leaving. Written by hand in the shape tonic-build generates, like [`super`]; the
//! contract is equivalent to:
//!
//! ```proto
//! syntax = "proto3";
//! package pilotfish.host.v1;
//!
//! service Host {
//!   // Opened by the agent (secure mode: with its node certificate) and kept open. The agent's
//!   // first message (id 0) names its node; then discovery sends a DumpRequest whenever an
//!   // operator asks for this host's config, and the agent answers each with the same id.
//!   rpc Attach(stream DumpReply) returns (stream DumpRequest);
//!   // The host is stopping: discovery marks its instances draining, pushes that, and answers
//!   // once the callers have accepted it (or after wait_ms).
//!   rpc Leave(LeaveRequest) returns (LeaveResponse);
//! }
//! message DumpRequest { uint64 id = 1; repeated string types = 2; }
//! message DumpReply   { uint64 id = 1; string node = 2; string config_dump_json = 3;
//!                       string error = 4; }
//! message LeaveRequest  { string node = 1; uint64 wait_ms = 2; }
//! message LeaveResponse { uint32 callers = 1; uint32 pending = 2; }
//! ```
//!
//! `types` are `clusters`, `endpoints`, `listeners`, `routes`, `secrets` (empty: all of them).
//! The dump is Envoy's `/config_dump` JSON with those sections only, private keys redacted.

use std::sync::Arc;

use tonic::codegen::{
    async_trait, http, Body, BoxFuture, BoxStream, Context, Poll, Service, StdError,
};

use super::ready;

pub const SERVICE_NAME: &str = "pilotfish.host.v1.Host";
const ATTACH_PATH: &str = "/pilotfish.host.v1.Host/Attach";
const LEAVE_PATH: &str = "/pilotfish.host.v1.Host/Leave";
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

#[derive(Clone, PartialEq, prost::Message)]
pub struct LeaveRequest {
    /// The leaving node (the certificate decides in secure mode).
    #[prost(string, tag = "1")]
    pub node: String,
    /// How long the agent waits for the answer (discovery answers by then).
    #[prost(uint64, tag = "2")]
    pub wait_ms: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LeaveResponse {
    /// Proxies that accepted the draining endpoints.
    #[prost(uint32, tag = "1")]
    pub callers: u32,
    /// Proxies that had not when discovery answered.
    #[prost(uint32, tag = "2")]
    pub pending: u32,
}

/// What discovery implements.
#[async_trait]
pub trait Host: Send + Sync + 'static {
    async fn attach(
        &self,
        request: tonic::Request<tonic::Streaming<DumpReply>>,
    ) -> Result<tonic::Response<BoxStream<DumpRequest>>, tonic::Status>;

    async fn leave(
        &self,
        request: tonic::Request<LeaveRequest>,
    ) -> Result<tonic::Response<LeaveResponse>, tonic::Status>;
}

struct Leave<T> {
    inner: Arc<T>,
}

impl<T: Host> tonic::server::UnaryService<LeaveRequest> for Leave<T> {
    type Response = LeaveResponse;
    type Future = BoxFuture<tonic::Response<LeaveResponse>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<LeaveRequest>) -> Self::Future {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move { inner.leave(request).await })
    }
}

/// The tonic service for a [`Host`]: add it to a `tonic::transport::Server`.
#[derive(Debug)]
pub struct HostServer<T> {
    inner: Arc<T>,
}

impl<T> HostServer<T> {
    pub fn new(inner: T) -> Self {
        HostServer {
            inner: Arc::new(inner),
        }
    }
}

impl<T> Clone for HostServer<T> {
    fn clone(&self) -> Self {
        HostServer {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<T> tonic::server::NamedService for HostServer<T> {
    const NAME: &'static str = SERVICE_NAME;
}

struct Attach<T> {
    inner: Arc<T>,
}

impl<T: Host> tonic::server::StreamingService<DumpReply> for Attach<T> {
    type Response = DumpRequest;
    type ResponseStream = BoxStream<DumpRequest>;
    type Future = BoxFuture<tonic::Response<Self::ResponseStream>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<tonic::Streaming<DumpReply>>) -> Self::Future {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move { inner.attach(request).await })
    }
}

impl<T, B> Service<http::Request<B>> for HostServer<T>
where
    T: Host,
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
        if req.uri().path() == LEAVE_PATH {
            let method = Leave {
                inner: Arc::clone(&self.inner),
            };
            return Box::pin(async move {
                let codec = tonic_prost::ProstCodec::<LeaveResponse, LeaveRequest>::default();
                let mut grpc = tonic::server::Grpc::new(codec);
                Ok(grpc.unary(method, req).await)
            });
        }
        if req.uri().path() != ATTACH_PATH {
            return Box::pin(async move {
                Ok(tonic::Status::unimplemented("no such Host method").into_http())
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
pub struct HostClient<T> {
    inner: tonic::client::Grpc<T>,
}

impl<T> HostClient<T>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<StdError>,
    T::ResponseBody: Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <T::ResponseBody as Body>::Error: Into<StdError> + Send,
{
    pub fn new(inner: T) -> Self {
        HostClient {
            inner: tonic::client::Grpc::new(inner).max_encoding_message_size(MAX_DUMP_BYTES),
        }
    }

    /// Tells discovery this host is leaving; answers once callers stopped choosing it.
    pub async fn leave(
        &mut self,
        request: LeaveRequest,
    ) -> Result<tonic::Response<LeaveResponse>, tonic::Status> {
        let request = ready(
            &mut self.inner,
            tonic::Request::new(request),
            SERVICE_NAME,
            "Leave",
        )
        .await?;
        let codec = tonic_prost::ProstCodec::<LeaveRequest, LeaveResponse>::default();
        self.inner
            .unary(
                request,
                http::uri::PathAndQuery::from_static(LEAVE_PATH),
                codec,
            )
            .await
    }

    /// Opens `Attach`: `replies` goes up (the hello first), requests come down.
    pub async fn attach(
        &mut self,
        replies: impl tonic::IntoStreamingRequest<Message = DumpReply>,
    ) -> Result<tonic::Response<tonic::codec::Streaming<DumpRequest>>, tonic::Status> {
        let request = ready(
            &mut self.inner,
            replies.into_streaming_request(),
            SERVICE_NAME,
            "Attach",
        )
        .await?;
        let codec = tonic_prost::ProstCodec::<DumpReply, DumpRequest>::default();
        self.inner
            .streaming(
                request,
                http::uri::PathAndQuery::from_static(ATTACH_PATH),
                codec,
            )
            .await
    }
}

//! ADS responses on the wire, encoded once and shared by every stream.
//!
//! A response is a protobuf message, and concatenated protobuf encodings merge (repeated
//! fields append). So a response goes out as three pieces: the gRPC frame header, the encoded
//! resource entries (field 2 of `DiscoveryResponse` and of `DeltaDiscoveryResponse`), and the
//! stream's own fields (nonce, versions, type, removed names). The entries of a whole map are
//! encoded once per map and flavour and every stream sends the same [`Bytes`]; smaller sets
//! (one changed assignment) are encoded per response. Nothing per stream copies a map's
//! resources, and no send buffer keeps the largest response alive: the body hands `Bytes` to
//! hyper, which writes them out and drops them.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use envoy_types::pb::envoy::service::discovery::v3::Resource as WireResource;
use http::HeaderMap;
use http_body::Frame;
use prost::Message;
use tokio::sync::mpsc;
use tonic::Status;

use crate::resources::{large, MapKey, MapMemo, MemoKey, Resource, ResourceMap};

/// Which response message the entries belong to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    Sotw,
    Delta,
}

/// A response ready to send: shared resource entries and this stream's fields (`head`, the
/// response message without resources).
#[derive(Debug, Clone)]
pub struct Outgoing<M> {
    pub entries: Bytes,
    /// How many resources `entries` holds.
    pub count: usize,
    pub head: M,
}

impl<M> std::ops::Deref for Outgoing<M> {
    type Target = M;
    fn deref(&self) -> &M {
        &self.head
    }
}

impl<M: Message + Default> Outgoing<M> {
    /// The gRPC frame: header, entries, head.
    pub fn into_chunks(self) -> [Bytes; 3] {
        let head = Bytes::from(self.head.encode_to_vec());
        let len = self.entries.len() + head.len();
        let mut header = BytesMut::with_capacity(5);
        header.put_u8(0);
        header.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
        [header.freeze(), self.entries, head]
    }

    /// The whole message, decoded.
    #[cfg(test)]
    pub fn decoded(&self) -> M {
        let mut buf = self.entries.to_vec();
        self.head.encode(&mut buf).expect("a Vec grows");
        M::decode(buf.as_slice()).expect("entries and head decode")
    }
}

/// The entries for every resource of `map`, encoded once per map and flavour while the map
/// lives.
pub fn map_entries(map: &Arc<ResourceMap>, flavour: Flavour) -> Bytes {
    static MEMO: MapMemo<(MapKey, Flavour), Bytes> = MapMemo::new(16);
    MEMO.get_or_make((MapKey::of(map), flavour), large(&[map]), || {
        entries(map.values(), flavour)
    })
}

impl MemoKey for Flavour {
    fn same(&self, other: &Self) -> bool {
        self == other
    }
    fn alive(&self) -> bool {
        true
    }
}

/// The entries for these resources, encoded now.
pub fn entries<'a>(
    resources: impl IntoIterator<Item = &'a Arc<Resource>>,
    flavour: Flavour,
) -> Bytes {
    let mut buf = Vec::new();
    for r in resources {
        match flavour {
            Flavour::Sotw => prost::encoding::message::encode(2, &r.body, &mut buf),
            Flavour::Delta => prost::encoding::message::encode(
                2,
                &WireResource {
                    name: r.name.clone(),
                    version: r.version.clone(),
                    resource: Some(r.body.clone()),
                    ..Default::default()
                },
                &mut buf,
            ),
        }
    }
    Bytes::from(buf)
}

/// What a stream task hands its response body: the chunks of one response, or the status
/// that ends the stream.
pub type BodyItem = Result<[Bytes; 3], Status>;

/// The body of an ADS response: gRPC frames from the stream task, then the trailers.
pub struct AdsBody {
    rx: mpsc::Receiver<BodyItem>,
    chunks: VecDeque<Bytes>,
    done: bool,
}

impl AdsBody {
    pub fn new(rx: mpsc::Receiver<BodyItem>) -> AdsBody {
        AdsBody {
            rx,
            chunks: VecDeque::new(),
            done: false,
        }
    }
}

fn trailers(status: &Status) -> Frame<Bytes> {
    let mut headers = HeaderMap::new();
    // Only fails for a message that cannot be a header value; then the code alone goes.
    if status.add_header(&mut headers).is_err() {
        let _ = Status::new(status.code(), "").add_header(&mut headers);
    }
    Frame::trailers(headers)
}

impl http_body::Body for AdsBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        loop {
            if let Some(chunk) = self.chunks.pop_front() {
                if chunk.is_empty() {
                    continue;
                }
                return Poll::Ready(Some(Ok(Frame::data(chunk))));
            }
            if self.done {
                return Poll::Ready(None);
            }
            return match self.rx.poll_recv(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Some(Ok(chunks))) => {
                    self.chunks.extend(chunks);
                    continue;
                }
                Poll::Ready(Some(Err(status))) => {
                    self.done = true;
                    Poll::Ready(Some(Ok(trailers(&status))))
                }
                Poll::Ready(None) => {
                    self.done = true;
                    Poll::Ready(Some(Ok(trailers(&Status::ok("")))))
                }
            };
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.chunks.is_empty()
    }
}

/// The requests of one ADS stream, decoded from the request body. tonic's decoder keeps a
/// buffer the size of the largest request for the life of the stream (a SotW EDS ACK names
/// every cluster: tens of KB, times thousands of streams); this one lets it go between
/// requests.
pub struct Requests<M> {
    body: tonic::body::Body,
    buf: BytesMut,
    done: bool,
    max: usize,
    _message: std::marker::PhantomData<fn() -> M>,
}

impl<M: Message + Default> Requests<M> {
    pub fn new(body: tonic::body::Body, max: usize) -> Requests<M> {
        Requests {
            body,
            buf: BytesMut::new(),
            done: false,
            max,
            _message: std::marker::PhantomData,
        }
    }

    /// The next request; `None` when the client ended the stream.
    pub async fn message(&mut self) -> Result<Option<M>, Status> {
        use http_body_util::BodyExt;
        loop {
            if let Some(message) = self.decode()? {
                return Ok(Some(message));
            }
            if self.done {
                return match self.buf.is_empty() {
                    true => Ok(None),
                    false => Err(Status::invalid_argument(
                        "the stream ended inside a message",
                    )),
                };
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
                Some(Err(status)) => return Err(status),
                None => self.done = true,
            }
        }
    }

    fn decode(&mut self) -> Result<Option<M>, Status> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        if self.buf[0] != 0 {
            return Err(Status::unimplemented(
                "compressed requests are not supported",
            ));
        }
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len > self.max {
            return Err(Status::resource_exhausted(format!(
                "request of {len} bytes exceeds the limit of {} bytes",
                self.max
            )));
        }
        if self.buf.len() < 5 + len {
            return Ok(None);
        }
        let _ = self.buf.split_to(5);
        let body = self.buf.split_to(len);
        let message = M::decode(body.freeze())
            .map_err(|e| Status::invalid_argument(format!("malformed request: {e}")))?;
        if self.buf.is_empty() {
            self.buf = BytesMut::new();
        }
        Ok(Some(message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xds::testing::resources;
    use envoy_types::pb::envoy::service::discovery::v3::{
        DeltaDiscoveryResponse, DiscoveryResponse,
    };

    #[test]
    fn shared_entries_and_head_decode_as_one_message() {
        let res = resources(&["a", "b"], 1);
        for flavour in [Flavour::Sotw, Flavour::Delta] {
            let bytes = map_entries(&res.clusters, flavour);
            match flavour {
                Flavour::Sotw => {
                    let out = Outgoing {
                        entries: bytes,
                        count: 2,
                        head: DiscoveryResponse {
                            nonce: "7".into(),
                            ..Default::default()
                        },
                    };
                    let r = out.decoded();
                    assert_eq!((r.resources.len(), r.nonce.as_str()), (2, "7"));
                    assert_eq!(r.resources[0], res.clusters["a"].body);
                    let [header, entries, head] = out.into_chunks();
                    assert_eq!(header[0], 0);
                    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
                    assert_eq!(len as usize, entries.len() + head.len());
                }
                Flavour::Delta => {
                    let out = Outgoing {
                        entries: bytes,
                        count: 2,
                        head: DeltaDiscoveryResponse {
                            nonce: "8".into(),
                            removed_resources: vec!["c".into()],
                            ..Default::default()
                        },
                    };
                    let r = out.decoded();
                    assert_eq!(r.resources[1].name, "b");
                    assert_eq!(r.resources[1].version, res.clusters["b"].version);
                    assert_eq!(r.removed_resources, ["c"]);
                }
            }
        }
    }

    #[tokio::test]
    async fn requests_are_decoded_across_chunk_boundaries() {
        use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
        let mut wire = Vec::new();
        for nonce in ["1", "2"] {
            let m = DiscoveryRequest {
                response_nonce: nonce.into(),
                ..Default::default()
            }
            .encode_to_vec();
            wire.push(0u8);
            wire.extend_from_slice(&(m.len() as u32).to_be_bytes());
            wire.extend_from_slice(&m);
        }
        // Split mid-header and mid-message.
        let chunks: Vec<Result<Frame<Bytes>, Status>> = vec![
            Ok(Frame::data(Bytes::copy_from_slice(&wire[..3]))),
            Ok(Frame::data(Bytes::copy_from_slice(&wire[3..9]))),
            Ok(Frame::data(Bytes::copy_from_slice(&wire[9..]))),
        ];
        let body = http_body_util::StreamBody::new(futures::stream::iter(chunks));
        let mut requests = Requests::<DiscoveryRequest>::new(tonic::body::Body::new(body), 1024);
        let a = requests.message().await.expect("ok").expect("first");
        let b = requests.message().await.expect("ok").expect("second");
        assert_eq!(
            (a.response_nonce.as_str(), b.response_nonce.as_str()),
            ("1", "2")
        );
        assert!(requests.message().await.expect("ok").is_none());
    }

    #[test]
    fn large_maps_are_encoded_once() {
        let names: Vec<String> = (0..40).map(|i| format!("s{i}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let res = resources(&refs, 1);
        let a = map_entries(&res.clusters, Flavour::Sotw);
        let b = map_entries(&res.clusters, Flavour::Sotw);
        assert_eq!(a.as_ptr(), b.as_ptr(), "the same bytes, not a copy");
    }
}

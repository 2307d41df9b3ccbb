//! The listener: counts connections per client IP and refuses those over the cap, as Consul's
//! `limits.http_max_conns_per_client` does (it closes them). Also refuses everything while the
//! "down" fault is on.

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use crate::Shared;

#[derive(Debug, Default)]
pub(crate) struct ConnTable {
    pub current: BTreeMap<IpAddr, usize>,
    pub peak: BTreeMap<IpAddr, usize>,
    pub refused: u64,
    pub accepted: u64,
}

pub(crate) struct CappedListener {
    pub inner: TcpListener,
    pub shared: Arc<Shared>,
}

impl axum::serve::Listener for CappedListener {
    type Io = CountedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (stream, peer) = match self.inner.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                    continue;
                }
            };
            let (cap, down) = {
                let f = self.shared.faults();
                (f.max_conns_per_client, f.refuse_connections)
            };
            let ip = peer.ip();
            let admitted = {
                let mut t = lock(&self.shared.conns);
                let cur = t.current.get(&ip).copied().unwrap_or(0);
                if down || (cap > 0 && cur >= cap) {
                    t.refused += 1;
                    false
                } else {
                    t.accepted += 1;
                    t.current.insert(ip, cur + 1);
                    let peak = t.peak.entry(ip).or_insert(0);
                    *peak = (*peak).max(cur + 1);
                    true
                }
            };
            if !admitted {
                // Dropping the stream closes it: the client sees a reset or an empty reply.
                drop(stream);
                continue;
            }
            return (
                CountedStream {
                    inner: stream,
                    ip,
                    table: self.shared.conns.clone(),
                },
                peer,
            );
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A TCP stream that gives its slot back when the connection ends.
pub(crate) struct CountedStream {
    inner: TcpStream,
    ip: IpAddr,
    table: Arc<Mutex<ConnTable>>,
}

impl Drop for CountedStream {
    fn drop(&mut self) {
        let mut t = lock(&self.table);
        if let Some(c) = t.current.get_mut(&self.ip) {
            *c = c.saturating_sub(1);
        }
    }
}

impl AsyncRead for CountedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for CountedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

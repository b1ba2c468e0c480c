//! The control plane's HTTP server: an accept loop of our own instead of `axum::serve`, for
//! what that lacks:
//!
//! - A client gets `http_header_timeout` to send a request head, counted from when its
//!   connection opens or its previous response ends, so a connection that sends half a head,
//!   or nothing, or sits idle between requests is closed rather than held forever (hyper's
//!   header-read timer runs in both cases); and as long between the pieces of a body it
//!   announced.
//! - A write that makes no progress for `http_write_timeout` fails the connection
//!   ([`WriteTimeout`]): a client that stops reading a response, or a WebSocket viewer that
//!   stops reading frames, is dropped rather than holding a task and its buffers forever.
//! - Every request carries its TCP peer (`ConnectInfo<SocketAddr>`), for the login limiter.
//!
//! As with `axum::serve`: connections are HTTP/1.1 with upgrades (WebSockets), and on
//! shutdown no new connection is accepted, idle ones close, and requests in progress finish.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::http::Request;
use axum::serve::Listener;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_http::timeout::TimeoutBody;
use tower_service::Service;

/// How long a client has to send a request head, and to take in what is written to it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timeouts {
    pub header: Duration,
    pub write: Duration,
}

/// Serves `app` on `listener` until `shutdown`, then waits for the requests in progress.
pub(crate) async fn serve(
    mut listener: TcpListener,
    app: Router,
    timeouts: Timeouts,
    shutdown: CancellationToken,
) {
    let connections = TaskTracker::new();
    loop {
        // `Listener::accept` retries by itself on errors such as running out of descriptors.
        let (tcp, peer): (_, SocketAddr) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = Listener::accept(&mut listener) => accepted,
        };
        // Log frames are small and many: without TCP_NODELAY, Nagle's algorithm and delayed
        // ACKs hold some back for tens of milliseconds.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let app = app.clone();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                // A body is read under the same limit as a head, between its pieces: a client
                // that announces a body and never sends it is not waited for.
                let mut req =
                    req.map(|body| axum::body::Body::new(TimeoutBody::new(timeouts.header, body)));
                req.extensions_mut().insert(ConnectInfo(peer));
                app.clone().call(req)
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(timeouts.header)
                .serve_connection(
                    TokioIo::new(WriteTimeout::new(tcp, timeouts.write)),
                    service,
                )
                .with_upgrades();
            let mut conn = std::pin::pin!(conn);
            let result = tokio::select! {
                result = conn.as_mut() => result,
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                // Mostly clients that went away, or were too slow with a request head.
                tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
            }
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// A connection whose writes fail once they have made no progress for `limit`. It stays
/// under upgraded connections too, so WebSocket frames to a viewer are bound by it as well.
/// Reads have no limit here: a WebSocket may rightly be quiet for long.
pub(crate) struct WriteTimeout<T> {
    inner: T,
    limit: Duration,
    /// Running while a write waits for the peer to take in data.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> WriteTimeout<T> {
    pub(crate) fn new(inner: T, limit: Duration) -> Self {
        WriteTimeout {
            inner,
            limit,
            stalled: None,
        }
    }

    /// Called when the inner write is pending: fails once it has been so for `limit`.
    fn poll_stall<R>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        let limit = self.limit;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the peer took in nothing for {} (http_write_timeout)",
                    sdp_config::ConfigDuration::from(limit)
                ),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn progressed<R>(
        &mut self,
        result: Poll<io::Result<R>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<R>> {
        match result {
            Poll::Pending => self.poll_stall(cx),
            ready => {
                self.stalled = None;
                ready
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WriteTimeout<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteTimeout<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.progressed(result, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.progressed(result, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_flush(cx);
        this.progressed(result, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.progressed(result, cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_write_the_peer_never_takes_in_fails_after_the_limit_and_progress_resets_it() {
        let (near, _far) = tokio::io::duplex(1024);
        let mut conn = WriteTimeout::new(near, Duration::from_secs(5));
        // Fills the pipe; the next write waits on a peer that reads nothing.
        conn.write_all(&[0; 1024]).await.unwrap();
        let err = conn.write_all(&[0; 1]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(err.to_string().contains("5s"), "{err}");

        // A peer that reads, however slowly, keeps the writes going.
        let (near, mut far2) = tokio::io::duplex(1024);
        let mut conn = WriteTimeout::new(near, Duration::from_secs(5));
        let reader = tokio::spawn(async move {
            let mut buf = vec![0; 1024];
            let mut total = 0;
            while total < 8 * 1024 {
                tokio::time::sleep(Duration::from_secs(4)).await;
                total += far2.read(&mut buf).await.unwrap();
            }
        });
        conn.write_all(&[0; 8 * 1024]).await.unwrap();
        reader.await.unwrap();
    }
}

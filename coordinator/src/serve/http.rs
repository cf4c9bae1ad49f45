//! The HTTP/1.1 connection layer of `moeshard serve`: hyper's server with a timer, so that slow
//! and idle clients are dropped, and a cap on open connections.
//!
//! - A client has [`HttpLimits::header_timeout`] to send a request's head. hyper starts that
//!   timer whenever the connection waits for a head, so it also closes a keep-alive connection
//!   idle that long between requests (and a slowloris that never finishes its headers).
//! - Between two chunks of a request body a client may pause at most
//!   [`HttpLimits::body_timeout`] (tower-http's `RequestBodyTimeoutLayer`, in [`super::router`]);
//!   bodies are capped at [`HttpLimits::max_body`] bytes (413).
//! - At most [`HttpLimits::max_connections`] connections are open at once; one more is accepted
//!   and closed at once, without a response, so it costs nothing but the accept.
//!
//! HTTP/2 is not offered: the OpenAI and Ollama clients speak HTTP/1.1, and one protocol keeps
//! the timeouts above exact.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// How long in-flight requests may run after Ctrl-C before the server exits anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How long to wait before accepting again after `accept` failed (e.g. out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Limits that keep slow, idle, numerous or oversized clients from holding the server's memory,
/// sockets and tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// The largest request body accepted, in bytes (413 beyond).
    pub max_body: usize,
    /// The time a client has to send a request's head (request line and headers), counted from
    /// the moment the connection waits for one: also the idle time of a keep-alive connection.
    pub header_timeout: Duration,
    /// The longest pause while a request body is received.
    pub body_timeout: Duration,
    /// Connections open at once; a connection beyond is closed as soon as it is accepted.
    pub max_connections: usize,
}

/// Accepts connections on `listener` and serves `app` on each until `shutdown` completes; then
/// stops accepting and gives open connections [`SHUTDOWN_GRACE`] to finish.
pub async fn serve_connections(
    listener: TcpListener,
    app: Router,
    limits: HttpLimits,
    shutdown: impl Future<Output = ()>,
) {
    let open = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!("accepting a connection failed: {e}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "connection closed: {} connections are open (--max-connections)", limits.max_connections);
            continue;
        };
        let conn =
            graceful.watch(builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone())));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, "connection ended: {e}");
            }
            drop(permit);
        });
    }
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await.is_err() {
        tracing::warn!("requests still running {} s after shutdown began; exiting", SHUTDOWN_GRACE.as_secs());
    }
}

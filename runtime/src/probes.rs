//! One HTTP listener serving `/metrics` (Prometheus text), `/healthz` (the process works) and
//! `/readyz` (it can do its job now). The caller says what each answers through [`Endpoints`];
//! the routes, status codes and bodies are the same in every binary.
//!
//! A binary may add routes of its own ([`ProbeServer::start_with`]; `cairn-ipam`'s web view).
//!
//! The server runs on its own task from [`ProbeServer::start`] until [`ProbeServer::stop`]
//! (which lets requests in flight finish) or until the handle is dropped.

use std::{future::Future, net::SocketAddr, sync::Arc};

use axum::{Router, extract::State, http::StatusCode, routing::get};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};

use crate::error::Error;

/// A probe's answer: 200 or 503, with a one-line body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// 200 with this body.
    Ok(&'static str),
    /// 503 with this body.
    Unavailable(&'static str),
}

impl Status {
    /// The usual readiness answer: `ready` or `not ready`.
    pub fn ready_if(ready: bool) -> Self {
        if ready {
            Status::Ok("ready\n")
        } else {
            Status::Unavailable("not ready\n")
        }
    }

    fn reply(self) -> (StatusCode, &'static str) {
        match self {
            Status::Ok(body) => (StatusCode::OK, body),
            Status::Unavailable(body) => (StatusCode::SERVICE_UNAVAILABLE, body),
        }
    }
}

/// What the three paths answer. Called for every request, so keep each cheap.
pub trait Endpoints: Send + Sync + 'static {
    /// The `/metrics` text.
    fn metrics(&self) -> impl Future<Output = String> + Send;

    /// `/healthz`; by default the process answering is proof enough: `ok`.
    fn health(&self) -> impl Future<Output = Status> + Send {
        std::future::ready(Status::Ok("ok\n"))
    }

    /// `/readyz`.
    fn readiness(&self) -> impl Future<Output = Status> + Send;
}

/// A running probe server.
#[derive(Debug)]
pub struct ProbeServer {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl ProbeServer {
    /// Binds `addr` (errors name `flag`, e.g. `--metrics-listen`) and serves `endpoints` on a
    /// task of its own. A serving failure after the bind is logged, not returned: probes and
    /// metrics are not worth stopping the process for.
    pub async fn start<E: Endpoints>(
        flag: &'static str,
        addr: SocketAddr,
        endpoints: Arc<E>,
    ) -> Result<Self, Error> {
        Self::start_with(flag, addr, endpoints, Router::new()).await
    }

    /// [`ProbeServer::start`], also serving `extra`'s routes (which must not use the three
    /// probe paths). Requests in flight on `extra` must end on their own for [`ProbeServer::stop`]
    /// to return (long-lived streams: end them on the caller's shutdown signal).
    pub async fn start_with<E: Endpoints>(
        flag: &'static str,
        addr: SocketAddr,
        endpoints: Arc<E>,
        extra: Router,
    ) -> Result<Self, Error> {
        let bind_err = |source| Error::Bind { flag, addr, source };
        let listener = TcpListener::bind(addr).await.map_err(bind_err)?;
        let bound = listener.local_addr().map_err(bind_err)?;
        let app = Router::new()
            .route(
                "/metrics",
                get(|State(e): State<Arc<E>>| async move { e.metrics().await }),
            )
            .route(
                "/healthz",
                get(|State(e): State<Arc<E>>| async move { e.health().await.reply() }),
            )
            .route(
                "/readyz",
                get(|State(e): State<Arc<E>>| async move { e.readiness().await.reply() }),
            )
            .with_state(endpoints)
            .merge(extra);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                // Resolves on `stop` and also when the handle (the sender) is dropped.
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "metrics server failed");
            }
        });
        tracing::info!(addr = %bound, "serving /metrics, /healthz, /readyz");
        Ok(ProbeServer {
            addr: bound,
            stop,
            task,
        })
    }

    /// The bound address (the real port when asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, lets requests in flight finish, and returns once the listener is closed.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpStream,
        sync::watch,
    };

    use super::*;

    struct Fake {
        ready: watch::Receiver<bool>,
    }

    impl Endpoints for Fake {
        async fn metrics(&self) -> String {
            "fake_metric 1\n".to_string()
        }
        async fn readiness(&self) -> Status {
            Status::ready_if(*self.ready.borrow())
        }
    }

    /// One HTTP/1.1 GET; returns the status code and body.
    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut raw = String::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut raw))
            .await
            .unwrap()
            .unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        let code = head.split(' ').nth(1).unwrap().parse().unwrap();
        (code, body.to_string())
    }

    #[tokio::test]
    async fn serves_the_three_paths_on_loopback() {
        let (ready_tx, ready) = watch::channel(false);
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let server = ProbeServer::start("--metrics-listen", any, Arc::new(Fake { ready }))
            .await
            .unwrap();
        let addr = server.local_addr();
        assert_ne!(addr.port(), 0);

        assert_eq!(get(addr, "/healthz").await, (200, "ok\n".into()));
        assert_eq!(get(addr, "/readyz").await, (503, "not ready\n".into()));
        ready_tx.send(true).unwrap();
        assert_eq!(get(addr, "/readyz").await, (200, "ready\n".into()));
        assert_eq!(get(addr, "/metrics").await, (200, "fake_metric 1\n".into()));
        assert_eq!(get(addr, "/nothing").await.0, 404);

        server.stop().await;
        let refused = TcpStream::connect(addr).await.unwrap_err();
        assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    }

    #[tokio::test]
    async fn a_taken_address_is_an_error_naming_the_flag() {
        let (_tx, ready) = watch::channel(true);
        let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = taken.local_addr().unwrap();
        let e = ProbeServer::start("--metrics-listen", addr, Arc::new(Fake { ready }))
            .await
            .unwrap_err();
        assert_eq!(e.to_string(), format!("binding --metrics-listen {addr}"));
        let Error::Bind { source, .. } = e;
        assert_eq!(source.kind(), std::io::ErrorKind::AddrInUse);
    }
}

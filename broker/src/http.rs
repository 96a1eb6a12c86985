//! The operator's HTTP endpoint: `/metrics` (OpenMetrics text), `/healthz` (the process
//! answers) and `/readyz` (listeners up, and the database reachable or the spool within bounds).
//!
//! hyper (HTTP/1 only) speaks HTTP; the accept loop is ours, so that connections stay
//! bounded: at most [`MAX_CONNECTIONS`] in all and [`MAX_CONNECTIONS_PER_ADDRESS`] from one
//! address (beyond either a connection is closed at once), so idle sockets from one host can
//! neither exhaust the process's file descriptors nor keep Prometheus from scraping. One
//! request per connection, its head at most [`MAX_REQUEST_BYTES`] and within
//! [`REQUEST_TIMEOUT`], the whole exchange too.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::metrics::exposition::{self, Exposition};
use crate::metrics::IngestMetrics;
use crate::per_address::AddressSlots;

/// Largest request head (request line and headers); a bigger one gets 431.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// How long a client may take to send its request head, and the whole exchange at most.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Open connections in all: a scraper and a few operators need a handful.
pub const MAX_CONNECTIONS: usize = 64;
/// Open connections from one address.
pub const MAX_CONNECTIONS_PER_ADDRESS: usize = 4;

/// What the endpoint reports on, shared with the rest of the broker.
pub struct Health {
    pub metrics: Arc<IngestMetrics>,
    /// The spool bound, to tell "spooling within bounds" from "about to refuse readings".
    pub spool_max_bytes: u64,
}

/// Binds `addr` (before returning, so a taken port fails the start) and serves until `stop`.
/// Requests already being answered finish on their own (within [`REQUEST_TIMEOUT`]).
pub async fn serve(
    addr: SocketAddr,
    health: Arc<Health>,
    stop: CancellationToken,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind(addr).await?;
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let per_address = AddressSlots::new(MAX_CONNECTIONS_PER_ADDRESS);
    let endpoint = Arc::new(Endpoint {
        exposition: Exposition::new(health.metrics.clone()),
        health,
    });
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(REQUEST_TIMEOUT)
        .max_buf_size(MAX_REQUEST_BYTES)
        .max_header_size(MAX_REQUEST_BYTES)
        .keep_alive(false);
    Ok(tokio::spawn(async move {
        loop {
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(error = %e, "metrics endpoint: accept failed");
                        // Out of file descriptors and the like: back off instead of spinning.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = stop.cancelled() => return,
            };
            // Over a limit: dropping the stream closes it.
            let Some(address_slot) = per_address.take(peer.ip()) else {
                continue;
            };
            let Ok(slot) = connections.clone().try_acquire_owned() else {
                continue;
            };
            let (http, endpoint) = (http.clone(), endpoint.clone());
            tokio::spawn(async move {
                let _held = (slot, address_slot);
                let service = service_fn(|request| {
                    let response = endpoint.respond(&request);
                    async move { Ok::<_, Infallible>(response) }
                });
                let exchange = http.serve_connection(TokioIo::new(stream), service);
                // A client that goes away or stalls mid-request is no concern of ours.
                let _ = tokio::time::timeout(REQUEST_TIMEOUT, exchange).await;
            });
        }
    }))
}

/// The three routes.
struct Endpoint {
    health: Arc<Health>,
    exposition: Exposition,
}

impl Endpoint {
    fn respond<B>(&self, request: &Request<B>) -> Response<String> {
        if request.method() != Method::GET {
            return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
        }
        match request.uri().path() {
            "/metrics" => match self.exposition.render() {
                Ok(body) => {
                    let mut response = Response::new(body);
                    response.headers_mut().insert(
                        CONTENT_TYPE,
                        HeaderValue::from_static(exposition::CONTENT_TYPE),
                    );
                    response
                }
                Err(_) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "cannot encode the metrics\n".into(),
                ),
            },
            "/healthz" => text(StatusCode::OK, "ok\n".into()),
            "/readyz" => match readiness(&self.health) {
                Ok(()) => text(StatusCode::OK, "ready\n".into()),
                Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
            },
            _ => text(
                StatusCode::NOT_FOUND,
                "try /metrics, /healthz or /readyz\n".into(),
            ),
        }
    }
}

fn text(status: StatusCode, body: String) -> Response<String> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Ready while readings can be made durable: written to the database, or spooled with room
/// left. (The listeners are up whenever this endpoint is: both start before it and a failed
/// listener stops the process.)
fn readiness(health: &Health) -> Result<(), String> {
    let m = &health.metrics;
    if m.database_up.load(Relaxed) == 1 {
        return Ok(());
    }
    let used = m.spool_bytes.load(Relaxed);
    if used < health.spool_max_bytes / 10 * 9 {
        Ok(())
    } else {
        Err(format!(
            "database down and spool nearly full ({used} of {} bytes)",
            health.spool_max_bytes
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(database_up: u64, spool_bytes: u64) -> Endpoint {
        let metrics = Arc::new(IngestMetrics::default());
        metrics.database_up.store(database_up, Relaxed);
        metrics.spool_bytes.store(spool_bytes, Relaxed);
        Endpoint {
            exposition: Exposition::new(metrics.clone()),
            health: Arc::new(Health {
                metrics,
                spool_max_bytes: 1000,
            }),
        }
    }

    fn get(endpoint: &Endpoint, method: &str, path: &str) -> (StatusCode, String, String) {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .body(())
            .unwrap();
        let response = endpoint.respond(&request);
        let content_type = response.headers()[CONTENT_TYPE]
            .to_str()
            .unwrap()
            .to_owned();
        (response.status(), content_type, response.into_body())
    }

    #[test]
    fn routes() {
        let up = endpoint(1, 0);
        let (status, content_type, body) = get(&up, "GET", "/metrics");
        assert_eq!(status, StatusCode::OK);
        assert_eq!(content_type, exposition::CONTENT_TYPE);
        assert!(body.contains("co2_database_up 1\n"), "{body}");
        assert_eq!(get(&up, "GET", "/healthz").0, StatusCode::OK);
        assert_eq!(get(&up, "GET", "/readyz").2, "ready\n");
        assert_eq!(get(&up, "GET", "/nope").0, StatusCode::NOT_FOUND);
        assert_eq!(
            get(&up, "POST", "/metrics").0,
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            get(&up, "HEAD", "/healthz").0,
            StatusCode::METHOD_NOT_ALLOWED
        );
    }

    #[test]
    fn ready_while_spooling_with_room_left() {
        assert_eq!(get(&endpoint(0, 899), "GET", "/readyz").0, StatusCode::OK);
        let (status, _, body) = get(&endpoint(0, 900), "GET", "/readyz");
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            body.contains("spool nearly full (900 of 1000 bytes)"),
            "{body}"
        );
        assert_eq!(get(&endpoint(0, 900), "GET", "/healthz").0, StatusCode::OK);
    }
}

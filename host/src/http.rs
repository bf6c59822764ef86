//! The host's small HTTP endpoint: `/metrics` (Prometheus), `/healthz` (the process is alive) and
//! `/readyz` (PostgreSQL and Redis reachable, plugins loaded). Enabled by `KALEIDOSCOPE_HTTP_ADDR`.
//!
//! Three GET routes do not justify an HTTP framework in the dependency tree: requests are read up
//! to the end of their headers and answered with `Connection: close`.

use crate::state::HostState;
use crate::status;
use anyhow::{Context, Result};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The largest request head accepted.
const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds `addr`, so the caller learns the port (e.g. for `:0`) and a busy port fails before
/// anything else starts; [`serve`] then answers on it.
pub async fn bind(addr: &str) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on KALEIDOSCOPE_HTTP_ADDR {addr:?}"))
}

/// Answers requests on `listener` until `stop` turns true.
pub async fn serve(
    listener: TcpListener,
    delivery: Arc<HostState>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.changed() => return,
        };
        match accepted {
            Ok((stream, _)) => {
                let delivery = delivery.clone();
                tokio::spawn(async move {
                    if let Err(error) = answer(stream, &delivery).await {
                        tracing::debug!("HTTP request failed: {error:#}");
                    }
                });
            }
            Err(error) => {
                tracing::warn!("HTTP accept failed: {error}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn answer(mut stream: TcpStream, delivery: &HostState) -> Result<()> {
    let mut head = Vec::new();
    let mut buffer = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let read = tokio::time::timeout(READ_TIMEOUT, stream.read(&mut buffer))
            .await
            .context("request timed out")??;
        if read == 0 || head.len() > MAX_REQUEST_BYTES {
            break;
        }
        head.extend_from_slice(&buffer[..read]);
    }
    let head = String::from_utf8_lossy(&head);
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET", "/healthz") => ("200 OK", "text/plain", "ok\n".to_string()),
        ("GET", "/readyz") => {
            let problems = delivery.not_ready();
            if problems.is_empty() {
                ("200 OK", "text/plain", "ready\n".to_string())
            } else {
                (
                    "503 Service Unavailable",
                    "text/plain",
                    format!("not ready:\n{}\n", problems.join("\n")),
                )
            }
        }
        ("GET", "/metrics") => (
            "200 OK",
            crate::metrics::CONTENT_TYPE,
            metrics(delivery).await,
        ),
        ("GET", _) => (
            "404 Not Found",
            "text/plain",
            "not found: try /metrics, /healthz or /readyz\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET\n".to_string(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await?;
    Ok(())
}

/// Measures the scrape-time gauges, then renders every series.
async fn metrics(delivery: &HostState) -> String {
    use crate::metrics::{ByDeadLetterKind, ByStatus, ByStream};
    let metrics = &delivery.metrics;
    let _one_scrape_at_a_time = metrics.scrape_lock().await;
    let scraped = &metrics.scraped;
    let snapshot = delivery.registry.snapshot();
    scraped
        .ready
        .set(i64::from(delivery.not_ready().is_empty()));
    scraped
        .heartbeat_age
        .set(delivery.heartbeat_age().as_secs_f64());
    scraped.plugins_loaded.set(snapshot.plugins().len() as i64);
    scraped
        .plugin_load_failures
        .set(snapshot.failures().len() as i64);
    let mut redis = delivery.redis.clone();
    // Streams come and go with their plugins: only those served now have series.
    for family in [
        &scraped.stream_pending,
        &scraped.stream_lag,
        &scraped.stream_length,
    ] {
        family.clear();
    }
    scraped.stream_oldest_pending_age.clear();
    for stream in snapshot.streams() {
        if let Ok(report) = status::stream_report(&mut redis, &delivery.config, stream).await {
            let labels = ByStream::new(stream);
            scraped
                .stream_pending
                .get_or_create(&labels)
                .set(report.pending);
            // 0 with nothing pending, so the series exists and an alert can compare it.
            let age_ms = report.oldest_pending_age_ms.unwrap_or(0);
            scraped
                .stream_oldest_pending_age
                .get_or_create(&labels)
                .set(age_ms as f64 / 1000.0);
            scraped
                .stream_length
                .get_or_create(&labels)
                .set(report.length);
            if let Some(lag) = report.lag {
                scraped.stream_lag.get_or_create(&labels).set(lag);
            }
        }
    }
    if let Ok(dead) = status::dead_letter_report(&mut redis, &delivery.config).await {
        // Every kind, 0 included, so an alert on one kind has a series from the start.
        for kind in crate::dead_letter::FailureKind::ALL {
            let n = dead.by_kind.get(kind.as_str()).copied().unwrap_or(0);
            scraped
                .dead_letters
                .get_or_create(&ByDeadLetterKind {
                    kind: kind.as_str(),
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }
    // While PostgreSQL is down the last counts stand (the series do not vanish).
    if let Ok(requests) = status::requests_by_status(&delivery.pool).await {
        scraped.requests.clear();
        // Every status, 0 included, so the series exist before the first request.
        for status in status::REQUEST_STATUSES {
            scraped
                .requests
                .get_or_create(&ByStatus {
                    status: status.to_string(),
                })
                .set(0);
        }
        for (status, n) in requests {
            scraped.requests.get_or_create(&ByStatus { status }).set(n);
        }
    }
    metrics.render()
}

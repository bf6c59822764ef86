//! The host's small HTTP endpoint: `/metrics` (Prometheus), `/healthz` (the process is alive) and
//! `/readyz` (PostgreSQL and Redis reachable, plugins loaded). Enabled by `KALEIDOSCOPE_HTTP_ADDR`.
//!
//! Three GET routes do not justify an HTTP framework in the dependency tree: requests are read up
//! to the end of their headers and answered with `Connection: close`.

use crate::metrics::{Gauge, labels};
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
            "text/plain; version=0.0.4",
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

async fn metrics(delivery: &HostState) -> String {
    let snapshot = delivery.registry.snapshot();
    let ready = if delivery.not_ready().is_empty() {
        1.0
    } else {
        0.0
    };
    let mut gauges = vec![
        Gauge::single(
            "kaleidoscope_ready",
            "1 when PostgreSQL and Redis are reachable and plugins are loaded.",
            ready,
        ),
        Gauge::single(
            "kaleidoscope_plugins_loaded",
            "Plugins currently loaded.",
            snapshot.plugins().len() as f64,
        ),
        Gauge::single(
            "kaleidoscope_plugin_load_failures",
            "Plugin files that currently fail to load.",
            snapshot.failures().len() as f64,
        ),
        Gauge {
            name: "kaleidoscope_build_info",
            help: "The host's version and the versions of the plugin contract it serves (always 1).",
            samples: vec![(
                labels(&[
                    ("version", env!("CARGO_PKG_VERSION")),
                    ("contract", "0.3.0"),
                    ("contracts_loaded", "0.1.0,0.2.0,0.3.0"),
                ]),
                1.0,
            )],
        },
    ];
    gauges.extend(crate::metrics::process_gauges());
    let mut pending = Vec::new();
    let mut lag = Vec::new();
    let mut length = Vec::new();
    let mut oldest = Vec::new();
    let mut redis = delivery.redis.clone();
    for stream in snapshot.streams() {
        if let Ok(report) = status::stream_report(&mut redis, &delivery.config, stream).await {
            pending.push((labels(&[("stream", stream)]), report.pending as f64));
            // 0 with nothing pending, so the series exists and an alert can compare it.
            let age_ms = report.oldest_pending_age_ms.unwrap_or(0);
            oldest.push((labels(&[("stream", stream)]), age_ms as f64 / 1000.0));
            length.push((labels(&[("stream", stream)]), report.length as f64));
            if let Some(l) = report.lag {
                lag.push((labels(&[("stream", stream)]), l as f64));
            }
        }
    }
    gauges.push(Gauge {
        name: "kaleidoscope_stream_pending",
        help: "Entries delivered to the group and not yet acknowledged.",
        samples: pending,
    });
    gauges.push(Gauge {
        name: "kaleidoscope_stream_oldest_pending_age_seconds",
        help: "Age of the oldest entry delivered and not acknowledged (0 when none): the stuck-consumer signal.",
        samples: oldest,
    });
    gauges.push(Gauge {
        name: "kaleidoscope_stream_lag",
        help: "Entries not yet delivered to the group.",
        samples: lag,
    });
    gauges.push(Gauge {
        name: "kaleidoscope_stream_length",
        help: "Entries in the stream.",
        samples: length,
    });
    if let Ok(dead) = status::dead_letter_report(&mut redis, &delivery.config).await {
        // Every kind, 0 included, so an alert on one kind has a series from the start.
        let samples = crate::dead_letter::FailureKind::ALL
            .iter()
            .map(|kind| {
                let n = dead.by_kind.get(kind.as_str()).copied().unwrap_or(0);
                (labels(&[("kind", kind.as_str())]), n as f64)
            })
            .collect();
        gauges.push(Gauge {
            name: "kaleidoscope_dead_letters",
            help: "Entries in the dead-letter stream, by failure kind (of the newest 10,000).",
            samples,
        });
    }
    // While PostgreSQL is down the last counts stand (the series does not vanish).
    let requests = match status::requests_by_status(&delivery.pool).await {
        Ok(requests) => {
            delivery.remember_requests(&requests);
            requests
        }
        Err(_) => delivery.last_requests(),
    };
    gauges.push(Gauge {
        name: "kaleidoscope_requests",
        help: "Tracked ML requests by status.",
        samples: requests
            .into_iter()
            .map(|(status, n)| (vec![("status", status)], n as f64))
            .collect(),
    });
    delivery.metrics.render(&gauges)
}

//! The host's small HTTP endpoint: `/metrics` (Prometheus), `/healthz` (the process is alive) and
//! `/readyz` (PostgreSQL and Redis reachable, every consumed stream served). Enabled by
//! `KALEIDOSCOPE_HTTP_ADDR`.
//!
//! HTTP/1.1 through `hyper` (keep-alive for Prometheus, `HEAD`, malformed requests refused by a
//! parser that has seen the world): three routes need no framework on top, so there is none.

use crate::shutdown::Shutdown;
use crate::state::HostState;
use crate::status;
use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// How long a client may take to send a request's head (a connection that trickles bytes is
/// closed).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections served at once. The endpoint is for a scraper, probes and an operator's curl;
/// beyond this, a new connection is answered `503` and closed at once, so idle clients can never
/// take the process's file descriptors (systemd's default limit is 1,024).
pub const MAX_CONNECTIONS: usize = 64;

/// How long one connection may live, idle keep-alive included; the client reconnects.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// Binds `addr`, so the caller learns the port (e.g. for `:0`) and a busy port fails before
/// anything else starts; [`serve`] then answers on it.
pub async fn bind(addr: &str) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on KALEIDOSCOPE_HTTP_ADDR {addr:?}"))
}

/// Answers requests on `listener` until `stop` turns true.
pub async fn serve(listener: TcpListener, state: Arc<HostState>, mut stop: Shutdown) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    tracing::debug!(%peer, "{MAX_CONNECTIONS} HTTP connections open already; refusing one");
                    tokio::spawn(refuse(stream));
                    continue;
                };
                let state = state.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    let service = hyper::service::service_fn(move |request| {
                        let state = state.clone();
                        async move { Ok::<_, std::convert::Infallible>(answer(request, &state).await) }
                    });
                    let connection = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(HEADER_READ_TIMEOUT)
                        .serve_connection(TokioIo::new(stream), service);
                    match tokio::time::timeout(CONNECTION_LIFETIME, connection).await {
                        Ok(Ok(())) => {}
                        Ok(Err(error)) => tracing::debug!("HTTP connection failed: {error}"),
                        Err(_) => tracing::debug!("HTTP connection closed after its lifetime"),
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

/// Answers a connection beyond [`MAX_CONNECTIONS`] with `503` and closes it.
async fn refuse(mut stream: tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt;
    const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 21\r\n\r\ntoo many connections\n";
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(BUSY)).await;
}

/// One request's answer.
async fn answer(request: Request<Incoming>, state: &HostState) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String| (status, "text/plain; charset=utf-8", body);
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&Method::GET | &Method::HEAD, "/healthz") => text(StatusCode::OK, "ok\n".into()),
        (&Method::GET | &Method::HEAD, "/readyz") => {
            let problems = state.not_ready();
            if problems.is_empty() {
                text(StatusCode::OK, "ready\n".into())
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready:\n{}\n", problems.join("\n")),
                )
            }
        }
        (&Method::GET | &Method::HEAD, "/metrics") => (
            StatusCode::OK,
            crate::metrics::CONTENT_TYPE,
            metrics(state).await,
        ),
        (&Method::GET | &Method::HEAD, _) => text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /healthz or /readyz\n".into(),
        ),
        _ => text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n".into()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// Measures the scrape-time gauges, then renders every series.
async fn metrics(state: &HostState) -> String {
    let metrics = &state.metrics;
    let _one_scrape_at_a_time = metrics.scrape_lock().await;
    let scraped = &metrics.scraped;
    let snapshot = state.registry.snapshot();
    scraped.ready.set(i64::from(state.not_ready().is_empty()));
    scraped
        .heartbeat_age
        .set(state.heartbeat_age().as_secs_f64());
    scraped.plugins_loaded.set(snapshot.plugins().len() as i64);
    scraped
        .plugin_load_failures
        .set(snapshot.failures().len() as i64);
    let mut redis = state.redis.clone();
    // Every stream consumed since start, served or not: a stream that lost its plugin keeps its
    // series (and says so), so the lag and stuck-consumer alerts can fire for it.
    let mut streams: std::collections::BTreeSet<String> =
        snapshot.streams().map(str::to_string).collect();
    streams.extend(state.consumed_streams());
    let latent = state.latent_failures();
    for cause in crate::state::Latent::ALL {
        scraped
            .restart_would_fail
            .get_or_create(&crate::metrics::ByCause {
                cause: cause.as_str().to_string(),
            })
            .set(i64::from(latent.contains_key(&cause)));
    }
    scraped.rollout_percent.clear();
    let followed = state.rollouts.snapshot();
    for plugin in snapshot.plugins() {
        let active = followed.for_live(plugin);
        scraped
            .rollout_percent
            .get_or_create(&crate::metrics::ByRolloutMode {
                plugin: plugin.name.clone(),
                mode: active
                    .as_ref()
                    .map_or("none", |a| a.mode.as_str())
                    .to_string(),
            })
            .set(active.map_or(0.0, |a| a.row.percent));
    }
    scraped.stream_unserved.clear();
    for stream in &streams {
        scraped
            .stream_unserved
            .get_or_create(&crate::metrics::ByStream::new(stream))
            .set(i64::from(snapshot.for_stream(stream).is_none()));
    }
    let consumed: Vec<String> = streams.iter().cloned().collect();
    measure_cluster(state, &mut redis, &consumed).await;
    measure_streams(state, &mut redis, streams.iter().map(String::as_str)).await;
    measure_request_streams(state, &mut redis).await;
    measure_dead_letters(state, &mut redis).await;
    measure_requests(state).await;
    measure_reprocessing(state).await;
    metrics.render()
}

/// On a Redis Cluster: which node holds each consumed stream, and which nodes are up.
async fn measure_cluster(
    state: &HostState,
    redis: &mut crate::redis_connection::RedisConnection,
    streams: &[String],
) {
    use crate::metrics::{ByNode, ByStreamNode};
    use crate::redis_connection::cluster;
    let scraped = &state.metrics.scraped;
    scraped.stream_node.clear();
    scraped.redis_node_up.clear();
    if !redis.is_cluster() {
        return;
    }
    let Ok(nodes) = cluster::nodes(redis).await else {
        return;
    };
    for stream in streams {
        let node = cluster::primary_for(&nodes, &state.config.stream_key(stream));
        let labels = ByStreamNode {
            stream: stream.clone(),
            node: node.unwrap_or("none").to_string(),
        };
        scraped.stream_node.get_or_create(&labels).set(1);
    }
    for node in nodes {
        let labels = ByNode {
            node: node.node,
            role: node.role,
        };
        scraped
            .redis_node_up
            .get_or_create(&labels)
            .set(i64::from(node.up));
    }
}

/// The consumed streams' pending entries, their age, lag and length.
async fn measure_streams<'s>(
    state: &HostState,
    redis: &mut crate::redis_connection::RedisConnection,
    streams: impl Iterator<Item = &'s str>,
) {
    use crate::metrics::ByStream;
    let scraped = &state.metrics.scraped;
    // Streams come and go: only those consumed since start (served now or not) have series.
    for family in [
        &scraped.stream_pending,
        &scraped.stream_lag,
        &scraped.stream_length,
    ] {
        family.clear();
    }
    scraped.stream_oldest_pending_age.clear();
    for stream in streams {
        if let Ok(report) = status::stream_report(redis, &state.config, stream).await {
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
}

/// The request streams' length, and per ML consumer group its lag and pending requests.
async fn measure_request_streams(
    state: &HostState,
    redis: &mut crate::redis_connection::RedisConnection,
) {
    use crate::metrics::{ByGroup, ByStream};
    let scraped = &state.metrics.scraped;
    scraped.request_stream_length.clear();
    scraped.request_stream_lag.clear();
    scraped.request_stream_pending.clear();
    for stream in crate::ml::REQUEST_STREAMS {
        let Ok(report) = status::request_stream_report(redis, &state.config, stream).await else {
            continue;
        };
        scraped
            .request_stream_length
            .get_or_create(&ByStream::new(stream))
            .set(report.length);
        for group in report.groups {
            let labels = ByGroup {
                stream: stream.to_string(),
                group: group.name,
            };
            if let Some(lag) = group.lag {
                scraped.request_stream_lag.get_or_create(&labels).set(lag);
            }
            scraped
                .request_stream_pending
                .get_or_create(&labels)
                .set(group.pending);
        }
    }
}

/// The dead letters by failure kind.
async fn measure_dead_letters(
    state: &HostState,
    redis: &mut crate::redis_connection::RedisConnection,
) {
    use crate::metrics::ByDeadLetterKind;
    let scraped = &state.metrics.scraped;
    if let Ok(dead) = status::dead_letter_report(redis, &state.config).await {
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
}

/// The tracked requests by status.
/// The fleet's reprocessing runs (not ended, or ended in the last day), from PostgreSQL.
async fn measure_reprocessing(state: &HostState) {
    use crate::metrics::{ByRunOutcome, ByRunState};
    let scraped = &state.metrics.scraped;
    let fleet = crate::persist::plugin_store::fleet(&state.config);
    // While PostgreSQL is down the last figures stand (the series do not vanish).
    let Ok(runs) = crate::persist::reprocess_runs::recent(&state.pool, &fleet, 24.0).await else {
        return;
    };
    scraped.reprocess_entries.clear();
    scraped.reprocess_runs.clear();
    // Every state, 0 included, so an alert on `stalled` or `failed` has its series.
    for run_state in crate::persist::reprocess_runs::STATES {
        scraped
            .reprocess_runs
            .get_or_create(&ByRunState {
                state: run_state.to_string(),
            })
            .set(0);
    }
    for run in &runs {
        let run_state = if run.stalled() { "stalled" } else { &run.state };
        scraped
            .reprocess_runs
            .get_or_create(&ByRunState {
                state: run_state.to_string(),
            })
            .inc();
        for (outcome, n) in [
            ("selected", run.selected),
            ("processed", run.processed),
            ("dead-lettered", run.dead_lettered),
            ("skipped", run.skipped),
            ("missing", run.missing),
            ("emits-suppressed", run.emits_suppressed),
        ] {
            scraped
                .reprocess_entries
                .get_or_create(&ByRunOutcome {
                    run: run.id.to_string(),
                    stream: run.stream.clone(),
                    plugin: run.plugin.clone(),
                    version: run.plugin_version.clone(),
                    outcome: outcome.to_string(),
                })
                .set(n);
        }
    }
}

async fn measure_requests(state: &HostState) {
    use crate::metrics::ByStatus;
    let scraped = &state.metrics.scraped;
    // While PostgreSQL is down the last counts stand (the series do not vanish).
    if let Ok(requests) = status::requests_by_status(&state.pool).await {
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
}

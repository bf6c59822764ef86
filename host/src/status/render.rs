//! `kaleidoscope status` as a table for people.

use super::Report;
use std::collections::BTreeMap;
use std::time::Duration;

/// The report as a human-readable table. Long on purpose: it is the report's layout, section
/// after section, top to bottom as the operator reads it; split up it would only be harder to see.
pub fn render(report: &Report) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "health: {}\n",
        if report.healthy { "ok" } else { "UNHEALTHY" }
    ));
    for problem in &report.problems {
        out.push_str(&format!("  ! {problem}\n"));
    }
    out.push_str("\nstreams:\n");
    out.push_str(&format!(
        "  {:<40} {:>8} {:>6} {:>8} {:>14}  consumers (pending/idle)\n",
        "stream", "length", "lag", "pending", "oldest pending"
    ));
    for stream in &report.streams {
        out.push_str(&stream_line(stream));
    }
    if let Some(nodes) = &report.redis_nodes {
        out.push_str("\nredis cluster nodes:\n");
        for node in nodes {
            let role = match &node.replica_of {
                Some(primary) => format!("replica of {primary}"),
                None => format!("{} ({} slots)", node.role, node.slots),
            };
            let state = if node.up { "up" } else { "DOWN" };
            out.push_str(&format!("  {:<22} {:<4} {role}\n", node.node, state));
        }
    }
    out.push_str("\nrequests to the ML services:\n");
    out.push_str(&format!(
        "  {:<40} {:>8}  groups (lag/pending/consumers)\n",
        "stream", "length"
    ));
    for stream in &report.request_streams {
        let groups = if stream.groups.is_empty() {
            "(no group: nothing consumes it yet)".to_string()
        } else {
            stream
                .groups
                .iter()
                .map(|g| {
                    let lag = g.lag.map_or("-".to_string(), |l| l.to_string());
                    format!("{} ({lag}/{}/{})", g.name, g.pending, g.consumers)
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        out.push_str(&format!(
            "  {:<40} {:>8}  {groups}\n",
            stream.stream, stream.length
        ));
    }
    let kinds = counts(&report.dead_letters.by_kind);
    out.push_str(&format!(
        "\ndead letters ({}): {} {}\n",
        report.dead_letters.stream, report.dead_letters.length, kinds
    ));
    match &report.requests {
        Some(requests) if requests.is_empty() => out.push_str("requests: none\n"),
        Some(requests) => out.push_str(&format!("requests: {}\n", counts(requests))),
        None => out.push_str("requests: (database unavailable)\n"),
    }
    if let Some(deployed) = &report.deployed {
        out.push_str("\nplugin store (deployed to every host):\n");
        if deployed.is_empty() {
            out.push_str("  (none: the hosts run what their plugins directories hold)\n");
        }
        for plugin in deployed {
            out.push_str(&format!(
                "  {} {} build {}  {:?}  by {} at {}\n",
                plugin.name,
                plugin.version,
                crate::plugin::build_of(&plugin.sha256),
                plugin.streams,
                plugin.deployed_by,
                plugin.deployed_at
            ));
        }
    }
    if let Some(rollouts) = report.rollouts.as_deref().filter(|r| !r.is_empty()) {
        out.push_str("\nrollouts in progress:\n");
        for line in super::rollouts::render(rollouts).lines() {
            out.push_str(&format!("  {line}\n"));
        }
    }
    if let Some(runs) = report.reprocessing.as_deref().filter(|r| !r.is_empty()) {
        out.push_str("\nreprocessing runs (in progress, or ended in the last day):\n");
        for run in runs {
            out.push_str(&format!("  {}\n", run.summary()));
        }
    }
    out.push_str("\nhosts:\n");
    if report.hosts.is_empty() {
        out.push_str("  (none running)\n");
    }
    for host in &report.hosts {
        let heartbeat = host
            .heartbeat_age_ms
            .map(|age| format!(", heartbeat {}s ago", age / 1000))
            .unwrap_or_default();
        out.push_str(&format!(
            "  {} (pid {}, up since {}{heartbeat}, plugins from {}){}\n",
            host.consumer,
            host.pid,
            host.started_at,
            host.plugins_dir,
            if host.ready { "" } else { "  NOT READY" }
        ));
        for name in &host.unmatched_plugin_sections {
            out.push_str(&format!(
                "    note: [plugins.{name}] in its configuration names no loaded plugin (a typo, or not deployed yet)\n"
            ));
        }
        // Columns as wide as their longest value (pre-release versions are long).
        let name_width = host.plugins.iter().map(|p| p.name.len()).max().unwrap_or(0);
        let version_width = host
            .plugins
            .iter()
            .map(|p| p.version.len())
            .max()
            .unwrap_or(0);
        for p in &host.plugins {
            out.push_str(&format!(
                "    {:<name_width$} {:<version_width$} {}  {}{}\n      grants: {}\n",
                p.name,
                p.version,
                crate::plugin::build_of(&p.sha256),
                p.streams.join(", "),
                if p.from_cache { "  (cached)" } else { "" },
                p.grants.summary()
            ));
        }
        for f in &host.failed_loads {
            out.push_str(&format!("    FAILED {}: {}\n", f.file, f.reason));
        }
    }
    out
}

/// One row of the streams table.
fn stream_line(s: &super::StreamReport) -> String {
    let lag = s.lag.map_or("-".to_string(), |l| l.to_string());
    let oldest = s.oldest_pending_age_ms.map_or("-".to_string(), |ms| {
        humantime::format_duration(Duration::from_millis(ms / 1000 * 1000)).to_string()
    });
    let consumers = if !s.group_exists {
        "(no group)".to_string()
    } else {
        s.consumers
            .iter()
            .map(|c| {
                format!(
                    "{} ({}/{})",
                    c.name,
                    c.pending,
                    humantime::format_duration(Duration::from_millis(
                        c.idle_ms.max(0) as u64 / 1000 * 1000
                    ))
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let consumers = match (&s.node, &s.error) {
        (_, Some(error)) => format!("(cannot be read: {error})"),
        (Some(node), None) => format!("{consumers}  [node {node}]"),
        (None, None) => consumers,
    };
    format!(
        "  {:<40} {:>8} {:>6} {:>8} {:>14}  {}\n",
        s.stream, s.length, lag, s.pending, oldest, consumers
    )
}

/// `name=count name=count ...`
fn counts<N: std::fmt::Display>(counts: &BTreeMap<String, N>) -> String {
    counts
        .iter()
        .map(|(name, n)| format!("{name}={n}"))
        .collect::<Vec<_>>()
        .join(" ")
}

//! The native reference consumer `kaleidoscope bench --reference native` measures the host
//! against: the limit of this machine for the shipped plugins' work, written by hand in Rust.
//!
//! It is `bench/baseline/consumer.py` (the Python reference) line for line, in Rust: no plugins,
//! no validation, no dead-letter stream, no reclaim, no outbox, no locks. It reads the three
//! result streams the bench loads and, per batch (up to 500 entries of one stream), runs one
//! transaction of
//!
//! - one ledger insert (`INSERT … SELECT unnest … ON CONFLICT DO NOTHING RETURNING`), so a
//!   redelivered entry is skipped,
//! - one merge upsert into `media_ai_insights` per column shape (the messages of one media folded
//!   first), one upsert of the faces, one insert of the errors,
//! - one `ml_requests` update for the results and one for the failures,
//!
//! then one XACK, one batch after the other on one connection each, on one thread. Values are
//! parsed and bound as typed arrays (`int8[]`, `bool[]`, `float8[]`, `text[]`); list columns
//! travel as array literals and embeddings as their JSON text, which PostgreSQL turns into
//! `real[]` itself (as the Python reference does).
//!
//! It uses the crates the host uses (`redis`, `sqlx`, `tokio`), so the bench builds no other
//! driver: the difference to the host is the host's own work, not a driver's.
//!
//! Environment: `REDIS_URL`, `DATABASE_URL`, `KALEIDOSCOPE_STREAM_PREFIX`, `BASELINE_BATCH` (500).
//! Stops after its current batch when it receives SIGTERM.

use anyhow::{Context, Result, bail};
use redis::AsyncCommands;
use redis::streams::{StreamReadOptions, StreamReadReply};
use sqlx::{Connection, PgConnection};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

const GROUP: &str = "native-group";
const CONSUMER: &str = "native";
const INSIGHTS: &str = "ml-insights-results";
const FACES: &str = "face-detection-results";
const ERRORS: &str = "ml-error-results";
const SERVICES: [&str; 5] = [
    "moderation",
    "tagging",
    "scene_recognition",
    "image_captioning",
    "image_embedding",
];

/// How a message field becomes a `media_ai_insights` column.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Kind {
    Int,
    Bool,
    Float,
    Text,
    /// A JSON list of strings, bound as a `text[]` literal.
    List,
    /// A JSON list of numbers, bound as its text and turned into `real[]` by PostgreSQL.
    Embedding,
}

/// `media_ai_insights` column, message field, kind, SQL type.
const COLUMNS: [(&str, &str, Kind, &str); 14] = [
    ("post_id", "postId", Kind::Int, "bigint"),
    ("is_safe", "isSafe", Kind::Bool, "boolean"),
    (
        "moderation_confidence",
        "moderationConfidence",
        Kind::Float,
        "float8",
    ),
    ("caption", "caption", Kind::Text, "text"),
    ("tags", "tags", Kind::List, "text[]"),
    ("scenes", "scenes", Kind::List, "text[]"),
    ("detected_objects", "detectedObjects", Kind::List, "text[]"),
    ("colors", "colors", Kind::List, "text[]"),
    ("quality_score", "qualityScore", Kind::Float, "float8"),
    (
        "has_adult_content",
        "hasAdultContent",
        Kind::Bool,
        "boolean",
    ),
    (
        "has_violent_content",
        "hasViolentContent",
        Kind::Bool,
        "boolean",
    ),
    ("dominant_emotion", "dominantEmotion", Kind::Text, "text"),
    (
        "image_embedding",
        "imageEmbedding",
        Kind::Embedding,
        "real[]",
    ),
    ("correlation_id", "correlationId", Kind::Text, "text"),
];
const FACE_STATUS: &str = "face_detection_status";
const FACES_DETECTED: &str = "faces_detected";

/// One parsed column value.
#[derive(Clone, Debug)]
enum Value {
    Int(i64),
    Bool(bool),
    Float(f64),
    Text(String),
}

/// The fields of one entry.
type Fields = HashMap<String, String>;
/// The entries read from one stream key: id and fields.
type Entries = Vec<(String, Fields)>;

/// The folded columns of one media and the services that reported on it.
#[derive(Default)]
struct Row {
    columns: BTreeMap<&'static str, Value>,
    services: Vec<&'static str>,
}

/// What one batch writes, folded per media and per correlation id.
#[derive(Default)]
struct Batch {
    rows: BTreeMap<i64, Row>,
    results: BTreeMap<String, Vec<&'static str>>,
}

impl Batch {
    fn merge(
        &mut self,
        media_id: i64,
        columns: Vec<(&'static str, Value)>,
        service: Option<&'static str>,
    ) {
        let row = self.rows.entry(media_id).or_default();
        row.columns.extend(columns);
        if let Some(service) = service
            && !row.services.contains(&service)
        {
            row.services.push(service);
        }
    }

    fn result(&mut self, fields: &Fields, name: &'static str) {
        if let Some(cid) = fields.get("correlationId").filter(|c| !c.is_empty()) {
            let got = self.results.entry(cid.clone()).or_default();
            if !got.contains(&name) {
                got.push(name);
            }
        }
    }
}

/// A PostgreSQL array literal, every element quoted.
fn literal<S: AsRef<str>>(items: impl IntoIterator<Item = S>) -> String {
    let mut out = String::from("{");
    for (i, item) in items.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('"');
        for c in item.as_ref().chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
    }
    out.push('}');
    out
}

fn parse(id: &str, field: &str, text: &str, kind: Kind) -> Result<Value> {
    let bad = || format!("entry {id}: field {field}: cannot read {text:?}");
    Ok(match kind {
        Kind::Int => Value::Int(text.parse().with_context(bad)?),
        Kind::Bool => Value::Bool(text == "true"),
        Kind::Float => Value::Float(text.parse().with_context(bad)?),
        Kind::Text | Kind::Embedding => Value::Text(text.to_string()),
        Kind::List => {
            let items: Vec<serde_json::Value> = serde_json::from_str(text).with_context(bad)?;
            Value::Text(literal(items.iter().map(|i| match i {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            })))
        }
    })
}

fn kind_of(column: &str) -> (Kind, &'static str) {
    match column {
        FACE_STATUS => (Kind::Text, "text"),
        FACES_DETECTED => (Kind::Int, "integer"),
        _ => COLUMNS
            .iter()
            .find(|(c, ..)| *c == column)
            .map_or((Kind::Text, "text"), |(_, _, kind, sql)| (*kind, *sql)),
    }
}

/// One merge upsert into `media_ai_insights` per column shape.
async fn upsert_insights(db: &mut PgConnection, rows: &BTreeMap<i64, Row>) -> Result<()> {
    let mut shapes: BTreeMap<Vec<&'static str>, Vec<(i64, &Row)>> = BTreeMap::new();
    for (media_id, row) in rows {
        let shape = row.columns.keys().copied().collect();
        shapes.entry(shape).or_default().push((*media_id, row));
    }
    for (shape, group) in shapes {
        let mut select = vec!["u.c0".to_string(), "CAST(u.c1 AS text[])".to_string()];
        let mut params = vec!["$1::int8[]".to_string(), "$2::text[]".to_string()];
        let mut query_args = Vec::new();
        for (i, column) in shape.iter().enumerate() {
            let n = i + 2;
            let (kind, sql) = kind_of(column);
            select.push(match kind {
                Kind::Embedding => format!("CAST(translate(u.c{n}, '[]', '{{}}') AS real[])"),
                _ => format!("CAST(u.c{n} AS {sql})"),
            });
            let bound = match kind {
                Kind::Int => "int8[]",
                Kind::Bool => "bool[]",
                Kind::Float => "float8[]",
                _ => "text[]",
            };
            params.push(format!("${}::{bound}", n + 1));
            query_args.push((*column, kind));
        }
        let names = ["media_id", "services_completed"]
            .into_iter()
            .chain(shape.iter().copied())
            .collect::<Vec<_>>()
            .join(", ");
        let mut sets = vec!["services_completed = ARRAY(SELECT DISTINCT ON (x) x FROM unnest(target.services_completed || EXCLUDED.services_completed) WITH ORDINALITY AS t(x, n) ORDER BY x, n)".to_string()];
        sets.extend(shape.iter().map(|c| format!("{c} = EXCLUDED.{c}")));
        let aliases = (0..shape.len() + 2)
            .map(|i| format!("c{i}"))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "INSERT INTO media_ai_insights AS target ({names}) SELECT {} FROM unnest({}) AS u({aliases}) ON CONFLICT (media_id) DO UPDATE SET {}",
            select.join(", "),
            params.join(", "),
            sets.join(", ")
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(group.iter().map(|(m, _)| *m).collect::<Vec<i64>>())
            .bind(
                group
                    .iter()
                    .map(|(_, r)| literal(r.services.iter()))
                    .collect::<Vec<String>>(),
            );
        for (column, kind) in query_args {
            let values = group.iter().map(|(_, r)| &r.columns[column]);
            query = match kind {
                Kind::Int => query.bind(
                    values
                        .map(|v| if let Value::Int(i) = v { *i } else { 0 })
                        .collect::<Vec<i64>>(),
                ),
                Kind::Bool => query.bind(
                    values
                        .map(|v| matches!(v, Value::Bool(true)))
                        .collect::<Vec<bool>>(),
                ),
                Kind::Float => query.bind(
                    values
                        .map(|v| if let Value::Float(f) = v { *f } else { 0.0 })
                        .collect::<Vec<f64>>(),
                ),
                _ => query.bind(
                    values
                        .map(|v| match v {
                            Value::Text(t) => t.clone(),
                            _ => String::new(),
                        })
                        .collect::<Vec<String>>(),
                ),
            };
        }
        query
            .execute(&mut *db)
            .await
            .context("upserting media_ai_insights")?;
    }
    Ok(())
}

/// Adds the services that reported to `ml_requests.results_received`.
async fn update_requests(
    db: &mut PgConnection,
    results: &BTreeMap<String, Vec<&'static str>>,
) -> Result<()> {
    if results.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "UPDATE ml_requests AS r SET results_received = ARRAY(SELECT DISTINCT ON (x) x FROM unnest(r.results_received || CAST(u.got AS text[])) WITH ORDINALITY AS t(x, n) ORDER BY x, n) \
         FROM unnest($1::text[], $2::text[]) AS u(cid, got) WHERE r.correlation_id = u.cid",
    )
    .bind(results.keys().cloned().collect::<Vec<String>>())
    .bind(results.values().map(literal).collect::<Vec<String>>())
    .execute(db)
    .await
    .context("updating ml_requests")?;
    Ok(())
}

fn media_id(id: &str, fields: &Fields) -> Result<i64> {
    let text = fields.get("mediaId").map_or("", String::as_str);
    text.parse()
        .with_context(|| format!("entry {id}: field mediaId: cannot read {text:?}"))
}

async fn insights(db: &mut PgConnection, entries: &[(String, Fields)]) -> Result<()> {
    let mut batch = Batch::default();
    for (id, fields) in entries {
        let service = fields.get("service").map(String::as_str);
        let mut columns = Vec::new();
        for (column, field, kind, _) in COLUMNS {
            if let Some(text) = fields.get(field).filter(|t| !t.is_empty() && *t != "null") {
                columns.push((column, parse(id, field, text, kind)?));
            }
        }
        let known = service.and_then(|s| SERVICES.iter().find(|k| **k == s).copied());
        batch.merge(media_id(id, fields)?, columns, known);
        // The Python reference records an unknown service under its own name; the bench
        // generates none, so this one folds them into "insights" and stays allocation-free.
        let name = known.unwrap_or("insights");
        batch.result(fields, name);
    }
    upsert_insights(db, &batch.rows).await?;
    update_requests(db, &batch.results).await
}

/// One face of a detection, as `media_detected_faces` stores it.
struct Face {
    post_id: Option<i64>,
    bbox: [f64; 4],
    confidence: Option<f64>,
    embedding: Option<String>,
}

async fn faces(db: &mut PgConnection, entries: &[(String, Fields)]) -> Result<()> {
    let mut batch = Batch::default();
    let mut faces: BTreeMap<(i64, String), Face> = BTreeMap::new();
    for (id, fields) in entries {
        let media_id = media_id(id, fields)?;
        let listed: Vec<serde_json::Value> =
            serde_json::from_str(fields.get("faces").map_or("[]", |f| f.as_str()))
                .with_context(|| format!("entry {id}: field faces"))?;
        let post_id = match fields.get("postId").filter(|p| !p.is_empty()) {
            Some(p) => Some(
                p.parse::<i64>()
                    .with_context(|| format!("entry {id}: field postId"))?,
            ),
            None => None,
        };
        let mut columns = vec![
            (FACE_STATUS, Value::Text("COMPLETED".into())),
            (FACES_DETECTED, Value::Int(listed.len() as i64)),
        ];
        if let Some(post_id) = post_id {
            columns.push(("post_id", Value::Int(post_id)));
        }
        if let Some(cid) = fields.get("correlationId").filter(|c| !c.is_empty()) {
            columns.push(("correlation_id", Value::Text(cid.clone())));
        }
        batch.merge(media_id, columns, Some("face_detection"));
        for face in listed {
            let number = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0);
            let Some([x0, y0, x1, y1]) = face["bbox"]
                .as_array()
                .and_then(|b| <[_; 4]>::try_from(b.iter().map(number).collect::<Vec<_>>()).ok())
            else {
                bail!("entry {id}: field faces: a face without a bbox of four numbers");
            };
            let embedding = face
                .get("embedding")
                .and_then(|e| e.as_array())
                .filter(|e| e.iter().any(|x| x.as_f64() != Some(0.0)))
                .map(|e| serde_json::Value::Array(e.clone()).to_string());
            let face_id = match &face["faceId"] {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            faces.insert(
                (media_id, face_id),
                Face {
                    post_id,
                    bbox: [x0, y0, x1 - x0, y1 - y0],
                    confidence: face.get("confidence").and_then(|c| c.as_f64()),
                    embedding,
                },
            );
        }
        batch.result(fields, "face_detection");
    }
    upsert_insights(db, &batch.rows).await?;
    if !faces.is_empty() {
        let column = |i: usize| faces.values().map(|f| f.bbox[i]).collect::<Vec<f64>>();
        sqlx::query(
            "INSERT INTO media_detected_faces AS target (media_id, face_id, post_id, bbox_x, bbox_y, bbox_width, bbox_height, confidence, embedding) \
             SELECT m, f, p, x, y, w, h, c, CAST(translate(e, '[]', '{}') AS real[]) FROM unnest($1::int8[], $2::text[], $3::int8[], $4::float8[], $5::float8[], $6::float8[], $7::float8[], $8::float8[], $9::text[]) AS u(m, f, p, x, y, w, h, c, e) \
             ON CONFLICT (media_id, face_id) DO UPDATE SET post_id = EXCLUDED.post_id, bbox_x = EXCLUDED.bbox_x, bbox_y = EXCLUDED.bbox_y, \
             bbox_width = EXCLUDED.bbox_width, bbox_height = EXCLUDED.bbox_height, confidence = EXCLUDED.confidence, embedding = EXCLUDED.embedding",
        )
        .bind(faces.keys().map(|k| k.0).collect::<Vec<i64>>())
        .bind(faces.keys().map(|k| k.1.clone()).collect::<Vec<String>>())
        .bind(faces.values().map(|f| f.post_id).collect::<Vec<Option<i64>>>())
        .bind(column(0))
        .bind(column(1))
        .bind(column(2))
        .bind(column(3))
        .bind(faces.values().map(|f| f.confidence).collect::<Vec<Option<f64>>>())
        .bind(faces.values().map(|f| f.embedding.clone()).collect::<Vec<Option<String>>>())
        .execute(&mut *db)
        .await
        .context("upserting media_detected_faces")?;
    }
    update_requests(db, &batch.results).await
}

async fn errors(db: &mut PgConnection, entries: &[(String, Fields)]) -> Result<()> {
    let text = |f: &Fields, name: &str| f.get(name).filter(|v| !v.is_empty()).cloned();
    sqlx::query(
        "INSERT INTO ml_processing_errors (source_stream, entry_id, correlation_id, error, status) \
         SELECT $1, * FROM unnest($2::text[], $3::text[], $4::text[], $5::text[]) ON CONFLICT DO NOTHING",
    )
    .bind(ERRORS)
    .bind(entries.iter().map(|(id, _)| id.clone()).collect::<Vec<_>>())
    .bind(entries.iter().map(|(_, f)| text(f, "correlationId")).collect::<Vec<_>>())
    .bind(entries.iter().map(|(_, f)| f.get("error").cloned().unwrap_or_default()).collect::<Vec<_>>())
    .bind(entries.iter().map(|(_, f)| text(f, "status").unwrap_or_else(|| "FAILED".into())).collect::<Vec<_>>())
    .execute(&mut *db)
    .await
    .context("inserting ml_processing_errors")?;
    let failed: BTreeMap<String, String> = entries
        .iter()
        .filter_map(|(_, f)| {
            Some((
                text(f, "correlationId")?,
                f.get("error").cloned().unwrap_or_default(),
            ))
        })
        .collect();
    if !failed.is_empty() {
        sqlx::query(
            "UPDATE ml_requests AS r SET status = 'FAILED', error = u.error FROM unnest($1::text[], $2::text[]) AS u(cid, error) \
             WHERE r.correlation_id = u.cid AND r.status = 'PENDING'",
        )
        .bind(failed.keys().cloned().collect::<Vec<_>>())
        .bind(failed.values().cloned().collect::<Vec<_>>())
        .execute(&mut *db)
        .await
        .context("updating failed ml_requests")?;
    }
    Ok(())
}

/// One batch of one stream: claim, write, commit.
async fn handle(db: &mut PgConnection, stream: &str, entries: Entries) -> Result<()> {
    let mut tx = db.begin().await.context("BEGIN")?;
    let mut ids: Vec<&str> = entries.iter().map(|(id, _)| id.as_str()).collect();
    ids.sort_unstable();
    let claimed: Vec<(String,)> = sqlx::query_as(
        "INSERT INTO processed_entries (stream, entry_id, plugin, plugin_version) \
         SELECT $1, unnest($2::text[]), 'native', '1' ON CONFLICT DO NOTHING RETURNING entry_id",
    )
    .bind(stream)
    .bind(ids)
    .fetch_all(&mut *tx)
    .await
    .context("claiming the ledger rows")?;
    let claimed: std::collections::HashSet<String> = claimed.into_iter().map(|(id,)| id).collect();
    let entries: Entries = entries
        .into_iter()
        .filter(|(id, _)| claimed.contains(id))
        .collect();
    if !entries.is_empty() {
        match stream {
            INSIGHTS => insights(&mut tx, &entries).await?,
            FACES => faces(&mut tx, &entries).await?,
            ERRORS => errors(&mut tx, &entries).await?,
            other => bail!("no handler for stream {other}"),
        }
    }
    tx.commit().await.context("COMMIT")
}

/// The entries of one XREADGROUP reply, their field values as text.
fn entries_of(reply: StreamReadReply) -> Result<Vec<(String, Entries)>> {
    let mut out = Vec::new();
    for key in reply.keys {
        let mut entries = Vec::with_capacity(key.ids.len());
        for entry in key.ids {
            let mut fields = Fields::with_capacity(entry.map.len());
            for (name, value) in entry.map {
                let text = match value {
                    redis::Value::BulkString(bytes) => {
                        String::from_utf8(bytes).with_context(|| {
                            format!("{}: entry {}: field {name} is not UTF-8", key.key, entry.id)
                        })?
                    }
                    other => bail!("{}: entry {}: field {name} is {other:?}", key.key, entry.id),
                };
                fields.insert(name, text);
            }
            entries.push((entry.id, fields));
        }
        out.push((key.key, entries));
    }
    Ok(out)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let prefix = env("KALEIDOSCOPE_STREAM_PREFIX").unwrap_or_default();
    let batch: usize = match env("BASELINE_BATCH") {
        Some(b) => b.parse().context("BASELINE_BATCH: not a number")?,
        None => 500,
    };
    let redis_url = env("REDIS_URL").unwrap_or_else(|| "redis://127.0.0.1:6379".into());
    let database_url = env("DATABASE_URL").context("DATABASE_URL is not set")?;
    let mut redis = redis::Client::open(redis_url.as_str())
        .with_context(|| format!("REDIS_URL {redis_url}"))?
        .get_multiplexed_async_connection()
        .await
        .context("cannot connect to Redis")?;
    let mut db = PgConnection::connect(&database_url)
        .await
        .context("cannot connect to PostgreSQL")?;
    let keys: Vec<String> = [INSIGHTS, FACES, ERRORS]
        .iter()
        .map(|s| format!("{prefix}{s}"))
        .collect();
    for key in &keys {
        let created: redis::RedisResult<()> = redis.xgroup_create_mkstream(key, GROUP, "0").await;
        if let Err(e) = created
            && e.code() != Some("BUSYGROUP")
        {
            return Err(e).with_context(|| format!("cannot create the group on {key}"));
        }
    }
    let stopping = Arc::new(AtomicBool::new(false));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot listen for SIGTERM")?;
    let flag = stopping.clone();
    tokio::spawn(async move {
        term.recv().await;
        flag.store(true, Ordering::SeqCst);
    });
    let options = StreamReadOptions::default()
        .group(GROUP, CONSUMER)
        .count(batch)
        .block(200);
    let from = vec![">"; keys.len()];
    while !stopping.load(Ordering::SeqCst) {
        let reply: Option<StreamReadReply> = redis
            .xread_options(&keys, &from, &options)
            .await
            .context("XREADGROUP")?;
        let Some(reply) = reply else { continue };
        for (key, entries) in entries_of(reply)? {
            let stream = key.strip_prefix(&prefix).unwrap_or(&key).to_string();
            let ids: Vec<String> = entries.iter().map(|(id, _)| id.clone()).collect();
            handle(&mut db, &stream, entries)
                .await
                .with_context(|| format!("a batch of {stream}"))?;
            let _: i64 = redis
                .xack(&key, GROUP, &ids)
                .await
                .with_context(|| format!("XACK on {key}"))?;
        }
    }
    Ok(())
}

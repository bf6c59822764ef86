//! The entries the bench adds: generated deterministically from the mix, shaped as the seed and
//! the real producers write them, and added pre-loaded or at a rate.

use super::*;
use crate::ml::{
    ERROR_RESULTS as ERRORS, FACE_DETECTION_RESULTS as FACES, INSIGHTS_RESULTS as INSIGHTS,
    INSIGHTS_SERVICES as SERVICES,
};
use crate::progress::Progress;
use crate::redis_connection::RedisConnection;
use anyhow::{Context, Result, bail};
use sqlx::PgPool;
use std::process::Child;
use std::time::{Duration, Instant};

/// Waits until the subject has created its consumer groups (it is ready to read).
pub(super) async fn wait_for_groups(
    redis: &mut RedisConnection,
    prefix: &str,
    subject: Subject,
    child: &mut Child,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut ready = true;
        for stream in [INSIGHTS, FACES, ERRORS] {
            let groups: redis::RedisResult<Vec<redis::Value>> = redis::cmd("XINFO")
                .arg("GROUPS")
                .arg(format!("{prefix}{stream}"))
                .query_async(redis)
                .await;
            ready &= groups.is_ok_and(|g| !g.is_empty());
        }
        if ready {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "the {} subject exited at start-up ({status})",
                subject.name()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "the {} subject did not join its streams within 60 s",
                subject.name()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Adds the generated entries, all at once (pipelined) or at `rate` per second.
pub(super) async fn add_entries(
    redis: &mut RedisConnection,
    prefix: &str,
    data: &Generated,
    rate: Option<u64>,
    subject: Subject,
) -> Result<()> {
    let total = data.len();
    let started = Instant::now();
    let mut sent = 0;
    let verb = if rate.is_some() {
        "offering"
    } else {
        "loading"
    };
    let mut progress = Progress::new(
        &format!("{:<13} {verb:<9}", subject.name()),
        total as u64,
        "entries",
    );
    let chunk = match rate {
        Some(rate) => (rate / 100).max(1) as usize,
        None => 500,
    };
    while sent < total {
        if let Some(rate) = rate {
            let due = started + Duration::from_secs_f64(sent as f64 / rate as f64);
            tokio::time::sleep_until(due.into()).await;
        }
        let end = (sent + chunk).min(total);
        let commands = (sent..end)
            .map(|i| {
                let (stream, fields) = data.entry(i);
                crate::streams::xadd(&format!("{prefix}{stream}"), &fields)
            })
            .collect();
        let replies = redis
            .pipelined(commands)
            .await
            .context("XADD of the bench entries failed")?;
        if let Some(redis::Value::ServerError(error)) = replies
            .iter()
            .find(|reply| matches!(reply, redis::Value::ServerError(_)))
        {
            anyhow::bail!("XADD of the bench entries failed: {error}");
        }
        sent = end;
        progress.update(sent as u64, total as u64, "");
    }
    progress.finish(sent as u64, total as u64, "");
    Ok(())
}

/// The entries of a run, made on demand from their position (so 200,000 entries with embeddings
/// never sit in memory at once), and what they must leave in the database.
pub(super) struct Generated {
    pub(super) count: usize,
    pub(super) mix: Mix,
    /// Media ids range over `1..=media_range`.
    pub(super) media_range: i64,
    /// A few embeddings (JSON text), shared by all entries: their values do not matter, their
    /// size does.
    pub(super) embeddings: Vec<String>,
    /// Distinct media named by a result (rows expected in `media_ai_insights`).
    pub(super) media: i64,
    pub(super) faces: i64,
    pub(super) errors: i64,
}

/// A small deterministic generator (xorshift), so every subject gets the same entries.
pub(super) struct Random(u64);

impl Random {
    /// The generator of entry `i`: the same for every subject.
    pub(super) fn for_entry(i: usize) -> Random {
        let mut random =
            Random(0x9e37_79b9_7f4a_7c15 ^ (i as u64).wrapping_mul(0xbf58_476d_1ce4_e5b9));
        random.next();
        random
    }

    pub(super) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub(super) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub(super) fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

pub(super) const WORDS: [&str; 12] = [
    "beach", "sunset", "dog", "people", "city", "food", "mountain", "car", "tree", "night",
    "party", "snow",
];

/// What entry `i` is, decided by cheap draws only.
pub(super) enum Kind {
    SeedInsights,
    Service(&'static str),
    Faces(u64),
    Error,
}

impl Generated {
    pub(super) fn new(count: usize, mix: Mix, dims: usize) -> Generated {
        let mut random = Random(0x2545_f491_4f6c_dd1d);
        let embeddings = (0..16)
            .map(|_| {
                let values: Vec<String> = (0..dims)
                    .map(|_| format!("{:.4}", random.unit() * 2.0 - 1.0))
                    .collect();
                format!("[{}]", values.join(", "))
            })
            .collect();
        let mut generated = Generated {
            count,
            mix,
            // About three messages per media, as the real services send several per image.
            media_range: (count as i64 / 3).max(1),
            embeddings,
            media: 0,
            faces: 0,
            errors: 0,
        };
        let mut named = std::collections::HashSet::new();
        for i in 0..count {
            let (media_id, kind, _) = generated.draw(i);
            match kind {
                Kind::Error => generated.errors += 1,
                Kind::Faces(n) => {
                    generated.faces += n as i64;
                    named.insert(media_id);
                }
                _ => {
                    named.insert(media_id);
                }
            }
        }
        generated.media = named.len() as i64;
        generated
    }

    pub(super) fn len(&self) -> usize {
        self.count
    }

    /// The media and kind of entry `i`, and its generator positioned after those draws.
    pub(super) fn draw(&self, i: usize) -> (i64, Kind, Random) {
        let mut random = Random::for_entry(i);
        let media_id = 1 + random.below(self.media_range as u64) as i64;
        let slot = if self.mix == Mix::SeedInsights {
            0
        } else {
            i % 20
        };
        let kind = match slot {
            0..=6 => Kind::SeedInsights,
            7..=15 => Kind::Service(SERVICES[random.below(5) as usize]),
            16..=18 => Kind::Faces(random.below(4)),
            _ => Kind::Error,
        };
        (media_id, kind, random)
    }

    /// Entry `i`: its stream and fields. Long on purpose: one arm per message kind of the mix,
    /// each spelling out the wire shape it generates.
    pub(super) fn entry(&self, i: usize) -> (&'static str, Vec<(String, String)>) {
        let (media_id, kind, mut random) = self.draw(i);
        let post_id = 1 + (media_id - 1) / 3;
        let mut fields = vec![
            ("mediaId".to_string(), media_id.to_string()),
            ("postId".to_string(), post_id.to_string()),
        ];
        let correlation = ("correlationId".to_string(), format!("c-{media_id}"));
        let words = |random: &mut Random, n: u64| {
            let picked: Vec<String> = (0..1 + random.below(n))
                .map(|_| format!("\"{}\"", WORDS[random.below(WORDS.len() as u64) as usize]))
                .collect();
            format!("[{}]", picked.join(", "))
        };
        let embedding = |random: &mut Random| {
            self.embeddings[random.below(self.embeddings.len() as u64) as usize].clone()
        };
        let stream = match kind {
            Kind::SeedInsights => {
                fields.extend([
                    ("detectedObjects".into(), words(&mut random, 4)),
                    ("scenes".into(), words(&mut random, 2)),
                    ("colors".into(), words(&mut random, 3)),
                    ("qualityScore".into(), format!("{:.3}", random.unit())),
                    ("hasAdultContent".into(), "false".into()),
                    (
                        "hasViolentContent".into(),
                        (random.below(10) == 0).to_string(),
                    ),
                    correlation,
                ]);
                INSIGHTS
            }
            Kind::Service(service) => {
                fields.push(("service".into(), service.into()));
                fields.push(("timestamp".into(), "2026-04-15T08:04:56.123456Z".into()));
                match service {
                    "moderation" => {
                        fields.push(("isSafe".into(), (random.below(20) != 0).to_string()));
                        fields.push((
                            "moderationConfidence".into(),
                            format!("{:.3}", random.unit()),
                        ));
                    }
                    "tagging" => fields.push(("tags".into(), words(&mut random, 5))),
                    "scene_recognition" => fields.push(("scenes".into(), words(&mut random, 2))),
                    "image_captioning" => fields.push((
                        "caption".into(),
                        format!("A {} at the {}", WORDS[i % 12], WORDS[(i / 12) % 12]),
                    )),
                    _ => fields.push(("imageEmbedding".into(), embedding(&mut random))),
                }
                fields.push(correlation);
                fields.push(("version".into(), "1".into()));
                INSIGHTS
            }
            Kind::Faces(n) => {
                let listed: Vec<String> = (0..n)
                    .map(|k| {
                        let x = random.below(800);
                        let y = random.below(600);
                        format!(
                            "{{\"faceId\": \"f-{i}-{k}\", \"bbox\": [{x}, {y}, {}, {}], \"embedding\": {}, \"confidence\": {:.4}}}",
                            x + 40 + random.below(100),
                            y + 40 + random.below(100),
                            embedding(&mut random),
                            0.5 + random.unit() / 2.0
                        )
                    })
                    .collect();
                fields.extend([
                    ("facesDetected".into(), n.to_string()),
                    ("faces".into(), format!("[{}]", listed.join(", "))),
                    correlation,
                    ("timestamp".into(), "2026-04-15T08:04:56Z".into()),
                    ("version".into(), "1".into()),
                ]);
                FACES
            }
            Kind::Error => {
                fields = vec![
                    correlation,
                    ("error".into(), "model server unavailable".into()),
                    ("status".into(), "FAILED".into()),
                ];
                ERRORS
            }
        };
        (stream, fields)
    }

    /// The rows the backend would have: a user, posts, media, and the requests being answered.
    pub(super) async fn seed(&self, pool: &PgPool) -> Result<()> {
        let media = self.media_range;
        sqlx::query("INSERT INTO users (user_id, username) VALUES (1, 'bench')")
            .execute(pool)
            .await
            .context("cannot seed the bench user")?;
        sqlx::query(
            "INSERT INTO posts (post_id, author_id) SELECT g, 1 FROM generate_series(1, ($1 + 2) / 3) g",
        )
        .bind(media)
        .execute(pool)
        .await
        .context("cannot seed the bench posts")?;
        sqlx::query(
            "INSERT INTO post_media (media_id, post_id, media_url)
             SELECT g, 1 + (g - 1) / 3, 'https://cdn.example/' || g || '.jpg' FROM generate_series(1, $1) g",
        )
        .bind(media)
        .execute(pool)
        .await
        .context("cannot seed the bench media")?;
        sqlx::query(
            "INSERT INTO ml_requests (correlation_id, stream, post_id, media_id, fields, expected_results, attempts, last_published_at)
             SELECT 'c-' || g, 'post-image-processing', 1 + (g - 1) / 3, g, '{}',
                    ARRAY['moderation', 'tagging', 'scene_recognition', 'image_captioning', 'image_embedding', 'face_detection'],
                    1, now()
               FROM generate_series(1, $1) g",
        )
        .bind(media)
        .execute(pool)
        .await
        .context("cannot seed the bench requests")?;
        Ok(())
    }

    /// Checks the ledger, the stored rows and the pending lists against the entries.
    pub(super) async fn verify(
        &self,
        pool: &PgPool,
        redis: &mut RedisConnection,
        prefix: &str,
        subject: Subject,
    ) -> Result<String, String> {
        let count = |sql: &'static str| async move {
            sqlx::query_scalar::<_, i64>(sql)
                .fetch_one(pool)
                .await
                .map_err(|e| format!("{sql}: {e}"))
        };
        let ledger = count("SELECT count(*) FROM processed_entries").await?;
        let media = count("SELECT count(*) FROM media_ai_insights").await?;
        let faces = count("SELECT count(*) FROM media_detected_faces").await?;
        let errors = count("SELECT count(*) FROM ml_processing_errors").await?;
        let expect = |what: &str, got: i64, want: i64| {
            if got == want {
                Ok(())
            } else {
                Err(format!("{what}: {got} rows, expected {want}"))
            }
        };
        expect("ledger", ledger, self.count as i64)?;
        expect("media_ai_insights", media, self.media)?;
        expect("media_detected_faces", faces, self.faces)?;
        expect("ml_processing_errors", errors, self.errors)?;
        // Every media's request is answered by its results: a consumer that skips the
        // `ml_requests` update does less work than the others and must not pass for faster.
        let answered =
            count("SELECT count(*) FROM ml_requests WHERE cardinality(results_received) > 0")
                .await?;
        expect("ml_requests answered", answered, self.media)?;
        let group = subject.group();
        for stream in [INSIGHTS, FACES, ERRORS] {
            let reply: redis::Value = redis::cmd("XPENDING")
                .arg(format!("{prefix}{stream}"))
                .arg(group)
                .query_async(redis)
                .await
                .unwrap_or(redis::Value::Nil);
            if let redis::Value::Array(parts) = reply
                && let Some(redis::Value::Int(n)) = parts.first()
                && *n > 0
            {
                return Err(format!("{n} entries still pending on {stream}"));
            }
        }
        Ok(format!("{media} media, {faces} faces, {errors} errors"))
    }
}

//! The operator's own migrations: `*.sql` files in `KALEIDOSCOPE_MIGRATIONS_DIR`, applied once
//! each, in name order, at start-up, by `kaleidoscope migrate`, and whenever the plugins are
//! reloaded. How a plugin author's new table reaches a running host without a new host build
//! (the host's own migrations are compiled in).
//!
//! Each file runs in a transaction of its own together with its record in `operator_migrations`
//! (name and SHA-256), so it is applied exactly once even with several hosts starting at once. A
//! file whose content changed after it was applied is reported (a warning) and never run again,
//! and the files after it are applied as usual: write a new file instead, as with any migration
//! tool.

use anyhow::{Context, Result};
use sqlx::PgPool;
use std::path::Path;

/// Applies the files of `dir` not applied yet; returns the names of those it applied.
pub async fn apply(pool: &PgPool, dir: &Path) -> Result<Vec<String>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read the migrations directory {}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "sql") && path.is_file())
        .collect();
    files.sort();
    let mut applied = Vec::new();
    for file in files {
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let sql = std::fs::read_to_string(&file)
            .with_context(|| format!("cannot read migration {}", file.display()))?;
        let sha256 = crate::plugin::sha256_hex(sql.as_bytes());
        // The common case — already applied, unchanged — without taking the lock.
        let known: Option<String> =
            sqlx::query_scalar("SELECT sha256 FROM operator_migrations WHERE name = $1")
                .bind(&name)
                .fetch_optional(pool)
                .await?;
        if known.as_deref() == Some(sha256.as_str()) {
            continue;
        }
        let mut tx = pool.begin().await?;
        // One host at a time decides about one directory's files.
        sqlx::query("LOCK TABLE operator_migrations IN EXCLUSIVE MODE")
            .execute(&mut *tx)
            .await
            .context("cannot lock operator_migrations")?;
        let recorded: Option<String> =
            sqlx::query_scalar("SELECT sha256 FROM operator_migrations WHERE name = $1")
                .bind(&name)
                .fetch_optional(&mut *tx)
                .await?;
        match recorded {
            Some(hash) if hash == sha256 => continue,
            // Reported, never run again, and no reason to hold up the files after it (or the
            // host): what it says was applied in its first form.
            Some(_) => {
                tracing::warn!(
                    migration = %file.display(),
                    "the operator's migration was changed after it was applied; it is not run again (add a new file for further changes)"
                );
                continue;
            }
            None => {}
        }
        // Audited: the operator's own SQL, from a directory only the operator controls.
        if let Err(error) = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone()))
            .execute(&mut *tx)
            .await
        {
            anyhow::bail!(
                "migration {} failed; nothing of it was applied: {}",
                file.display(),
                sql_error(&error, &sql)
            );
        }
        sqlx::query("INSERT INTO operator_migrations (name, sha256) VALUES ($1, $2)")
            .bind(&name)
            .bind(&sha256)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        tracing::info!(migration = %file.display(), "applied the operator's migration");
        applied.push(name);
    }
    Ok(applied)
}

/// What PostgreSQL said about a migration's SQL, placed in the file: its message, SQLSTATE and
/// the line and column of the file it points at. (The error's own "line" is the line of
/// PostgreSQL's C source that raised it, which means nothing to whoever wrote the file.)
fn sql_error(error: &sqlx::Error, sql: &str) -> String {
    let Some(database) = error.as_database_error() else {
        return error.to_string();
    };
    let Some(postgres) = database.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() else {
        return database.message().to_string();
    };
    let mut said = format!("{} (SQLSTATE {})", postgres.message(), postgres.code());
    if let Some(sqlx::postgres::PgErrorPosition::Original(position)) = postgres.position() {
        let (line, column) = line_and_column(sql, position);
        said.push_str(&format!(" at line {line}, column {column} of the file"));
    }
    if let Some(detail) = postgres.detail() {
        said.push_str(&format!("; {detail}"));
    }
    said
}

/// The 1-based line and column of the `position`th character (1-based, as PostgreSQL counts)
/// of `text`.
fn line_and_column(text: &str, position: usize) -> (usize, usize) {
    let before: String = text.chars().take(position.saturating_sub(1)).collect();
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::line_and_column;

    #[test]
    fn positions_count_characters_from_one() {
        let sql = "CREATE TABLE t (a int);\nALTER TABLE nope ADD b int;\n";
        assert_eq!(line_and_column(sql, 1), (1, 1));
        let nope = sql.find("nope").unwrap() + 1;
        assert_eq!(line_and_column(sql, nope), (2, 13));
        assert_eq!(line_and_column("é\nx", 3), (2, 1));
    }
}

//! SQLite under `data_dir`, in WAL mode, with the migrations embedded in the binary.
//!
//! Every query of the control plane is a method here, one file per aggregate (sessions,
//! agents, sandboxes, deployments, steps), so the schema has one owner. Rows come out as
//! named structs with typed ids and states. Every transaction that writes takes the write
//! lock at its start (`BEGIN IMMEDIATE`): one that read first under a deferred transaction
//! could act on a snapshot another writer has changed meanwhile. A change made on someone's
//! behalf is written with its audit row, in the same transaction.

mod agents;
mod deployments;
mod follow;
mod runtime;
mod sandboxes;
mod sessions;
mod sleep;
mod states;
mod steps;

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, Sqlite, SqlitePool, Transaction};
use time::OffsetDateTime;

pub use deployments::{DeploymentRow, Finish, Placement};
pub use follow::{DeliveryRow, NewDelivery};
pub use sandboxes::{Instance, SandboxRow, Selection, WriteError};
pub use sleep::Slept;
pub use states::{DeploymentState, Ending, SandboxState, ServiceState};
pub use steps::EndedStep;

#[derive(Clone)]
pub struct Db {
    pool: SqlitePool,
}

/// Unix milliseconds, the form times take in the database.
pub fn to_millis(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

pub fn from_millis(ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// A column parsed into its type (an id, a name, a state): a value that does not parse is a
/// decode error, never a panic.
fn parsed<T>(row: &SqliteRow, column: &str) -> Result<T, sqlx::Error>
where
    T: FromStr,
    T::Err: std::error::Error + Send + Sync + 'static,
{
    let raw: String = row.try_get(column)?;
    raw.parse().map_err(|e: T::Err| sqlx::Error::ColumnDecode {
        index: column.to_owned(),
        source: Box::new(e),
    })
}

fn parsed_opt<T>(row: &SqliteRow, column: &str) -> Result<Option<T>, sqlx::Error>
where
    T: FromStr,
    T::Err: std::error::Error + Send + Sync + 'static,
{
    let raw: Option<String> = row.try_get(column)?;
    raw.map(|raw| {
        raw.parse().map_err(|e: T::Err| sqlx::Error::ColumnDecode {
            index: column.to_owned(),
            source: Box::new(e),
        })
    })
    .transpose()
}

/// Filters and page of a listing, newest first.
pub struct ListQuery {
    pub owner: Option<String>,
    pub state: Option<String>,
    /// Deployments of this sandbox only (an id).
    pub sandbox: Option<String>,
    pub limit: u32,
    /// `(created_at, id)` of the last item of the previous page.
    pub after: Option<(i64, String)>,
}

/// What a listing lists.
#[derive(Clone, Copy)]
enum Listing {
    Sandboxes,
    /// Owned by whoever requested them.
    Deployments,
}

/// Who did what to what: the audit row written with the change it describes.
pub struct Audit<'a> {
    pub actor: &'a str,
    pub action: &'a str,
    pub target: &'a str,
    pub detail: &'a str,
}

async fn insert_audit(
    tx: &mut sqlx::SqliteConnection,
    audit: &Audit<'_>,
    at: OffsetDateTime,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO audit (at, actor, action, target, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
    )
    .bind(to_millis(at))
    .bind(audit.actor)
    .bind(audit.action)
    .bind(audit.target)
    .bind(audit.detail)
    .execute(tx)
    .await?;
    Ok(())
}

impl Db {
    pub async fn open(data_dir: &Path) -> Result<Self, sqlx::Error> {
        std::fs::create_dir_all(data_dir).map_err(sqlx::Error::Io)?;
        let path = data_dir.join("sdp.db");
        let options = SqliteConnectOptions::from_str("sqlite:")?
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        Ok(Self { pool })
    }

    /// One page of a listing's rows, newest first, after the cursor's `(created_at, id)`.
    async fn page(&self, listing: Listing, q: &ListQuery) -> Result<Vec<SqliteRow>, sqlx::Error> {
        // Both names are ours, never the request's.
        let (table, owner, sandbox) = match listing {
            Listing::Sandboxes => ("sandboxes", "owner", "id"),
            Listing::Deployments => ("deployments", "requested_by", "sandbox_id"),
        };
        let sql = format!(
            "SELECT * FROM {table}
             WHERE (?1 IS NULL OR {owner} = ?1) AND (?2 IS NULL OR state = ?2)
               AND (?7 IS NULL OR {sandbox} = ?7)
               AND (created_at < ?3 OR (created_at = ?3 AND id < ?4) OR ?5)
             ORDER BY created_at DESC, id DESC LIMIT ?6"
        );
        let (after_t, after_id) = q.after.clone().unwrap_or((i64::MAX, String::new()));
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(&q.owner)
            .bind(&q.state)
            .bind(after_t)
            .bind(&after_id)
            .bind(q.after.is_none())
            .bind(i64::from(q.limit))
            .bind(&q.sandbox)
            .fetch_all(&self.pool)
            .await
    }

    /// A write transaction, holding the write lock from its first statement.
    async fn write(&self) -> Result<Transaction<'static, Sqlite>, sqlx::Error> {
        self.pool.begin_with("BEGIN IMMEDIATE").await
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// A database in a temporary folder, dropped with it.
    pub async fn temp_db() -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).await.unwrap();
        (dir, db)
    }
}

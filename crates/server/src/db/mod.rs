//! SQLite under `data_dir`, in WAL mode, with the migrations embedded in the binary.
//!
//! Every query of the control plane is a method here, so the schema has one owner.

mod sandboxes;

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};
use time::OffsetDateTime;

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

pub use sandboxes::{DeploymentRow, ListQuery, SandboxRow, Selection, WriteError};

pub struct SessionRow {
    pub username: String,
    pub expires_at: OffsetDateTime,
}

pub struct AgentRow {
    pub name: String,
    pub role: String,
    pub version: String,
    pub host: String,
    pub last_seen: OffsetDateTime,
    pub running: u32,
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

    pub async fn upsert_user(
        &self,
        username: &str,
        now: OffsetDateTime,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO users (username, created_at, last_login_at) VALUES (?1, ?2, ?2)
             ON CONFLICT (username) DO UPDATE SET last_login_at = excluded.last_login_at",
        )
        .bind(username)
        .bind(to_millis(now))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn insert_session(
        &self,
        token_hash: &str,
        username: &str,
        now: OffsetDateTime,
        expires_at: OffsetDateTime,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO sessions (token_hash, username, created_at, expires_at) VALUES (?1, ?2, ?3, ?4)",
        )
        .bind(token_hash)
        .bind(username)
        .bind(to_millis(now))
        .bind(to_millis(expires_at))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn session(&self, token_hash: &str) -> Result<Option<SessionRow>, sqlx::Error> {
        let row = sqlx::query("SELECT username, expires_at FROM sessions WHERE token_hash = ?1")
            .bind(token_hash)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| SessionRow {
            username: r.get("username"),
            expires_at: from_millis(r.get("expires_at")),
        }))
    }

    pub async fn delete_session(&self, token_hash: &str) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM sessions WHERE token_hash = ?1")
            .bind(token_hash)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Deletes the sessions that expired before `before`.
    pub async fn delete_expired_sessions(&self, before: OffsetDateTime) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM sessions WHERE expires_at <= ?1")
            .bind(to_millis(before))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn audit(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        detail: &str,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO audit (at, actor, action, target, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .bind(to_millis(OffsetDateTime::now_utc()))
        .bind(actor)
        .bind(action)
        .bind(target)
        .bind(detail)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn agent_connected(
        &self,
        name: &str,
        role: &str,
        version: &str,
        host: &str,
        now: OffsetDateTime,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO agents (name, role, version, host, connected, last_seen, running)
             VALUES (?1, ?2, ?3, ?4, 1, ?5, 0)
             ON CONFLICT (name) DO UPDATE SET role = excluded.role, version = excluded.version,
               host = excluded.host, connected = 1, last_seen = excluded.last_seen",
        )
        .bind(name)
        .bind(role)
        .bind(version)
        .bind(host)
        .bind(to_millis(now))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn agent_disconnected(
        &self,
        name: &str,
        last_seen: OffsetDateTime,
        running: u32,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE agents SET connected = 0, last_seen = ?2, running = ?3 WHERE name = ?1",
        )
        .bind(name)
        .bind(to_millis(last_seen))
        .bind(i64::from(running))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// At start no agent is connected yet, whatever the last run left behind.
    pub async fn mark_all_agents_disconnected(&self) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE agents SET connected = 0")
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn agents(&self) -> Result<Vec<AgentRow>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT name, role, version, host, last_seen, running FROM agents ORDER BY name",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| AgentRow {
                name: r.get("name"),
                role: r.get("role"),
                version: r.get("version"),
                host: r.get("host"),
                last_seen: from_millis(r.get("last_seen")),
                running: u32::try_from(r.get::<i64, _>("running")).unwrap_or(0),
            })
            .collect())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

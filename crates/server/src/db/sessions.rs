//! Users and sessions. Only a SHA-256 of each session token is stored; never a password.

use sqlx::Row;
use time::OffsetDateTime;

use super::{Audit, Db, from_millis, insert_audit, to_millis};

pub struct SessionRow {
    pub username: String,
    pub expires_at: OffsetDateTime,
}

impl Db {
    /// Records a login: the user, the session and the audit row, together.
    pub async fn login(
        &self,
        token_hash: &str,
        username: &str,
        now: OffsetDateTime,
        expires_at: OffsetDateTime,
        audit: &Audit<'_>,
    ) -> Result<(), sqlx::Error> {
        let mut tx = self.write().await?;
        sqlx::query(
            "INSERT INTO users (username, created_at, last_login_at) VALUES (?1, ?2, ?2)
             ON CONFLICT (username) DO UPDATE SET last_login_at = excluded.last_login_at",
        )
        .bind(username)
        .bind(to_millis(now))
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO sessions (token_hash, username, created_at, expires_at) VALUES (?1, ?2, ?3, ?4)",
        )
        .bind(token_hash)
        .bind(username)
        .bind(to_millis(now))
        .bind(to_millis(expires_at))
        .execute(&mut *tx)
        .await?;
        insert_audit(&mut tx, audit, now).await?;
        tx.commit().await
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

    /// Ends a session, with its audit row.
    pub async fn logout(&self, token_hash: &str, audit: &Audit<'_>) -> Result<(), sqlx::Error> {
        let mut tx = self.write().await?;
        sqlx::query("DELETE FROM sessions WHERE token_hash = ?1")
            .bind(token_hash)
            .execute(&mut *tx)
            .await?;
        insert_audit(&mut tx, audit, OffsetDateTime::now_utc()).await?;
        tx.commit().await
    }

    /// Deletes the sessions that expired before `before`.
    pub async fn delete_expired_sessions(&self, before: OffsetDateTime) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM sessions WHERE expires_at <= ?1")
            .bind(to_millis(before))
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

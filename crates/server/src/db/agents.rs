//! The agents seen, for `/api/agents` to show those that are gone too.

use sdp_protocol::{AgentName, Role};
use sqlx::Row;
use time::OffsetDateTime;

use super::{Db, from_millis, to_millis};

pub struct AgentRow {
    pub name: String,
    pub role: String,
    pub version: String,
    pub host: String,
    pub last_seen: OffsetDateTime,
    pub running: u32,
}

impl Db {
    pub async fn agent_connected(
        &self,
        name: &AgentName,
        role: Role,
        version: &str,
        host: &str,
        now: OffsetDateTime,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO agents (name, role, version, host, last_seen, running)
             VALUES (?1, ?2, ?3, ?4, ?5, 0)
             ON CONFLICT (name) DO UPDATE SET role = excluded.role, version = excluded.version,
               host = excluded.host, last_seen = excluded.last_seen",
        )
        .bind(name.as_str())
        .bind(role.as_str())
        .bind(version)
        .bind(host)
        .bind(to_millis(now))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn agent_disconnected(
        &self,
        name: &AgentName,
        last_seen: OffsetDateTime,
        running: u32,
    ) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE agents SET last_seen = ?2, running = ?3 WHERE name = ?1")
            .bind(name.as_str())
            .bind(to_millis(last_seen))
            .bind(i64::from(running))
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
}

//! `GET /api/agents`, the agents' WebSocket, and the deployment log WebSocket.

use super::{AppState, rfc3339};
use crate::error::ApiError;
use crate::hub::serve_agent;
use axum::Json;
use axum::extract::State;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::response::Response;
use sdp_protocol::{Capability, MAX_FRAME_BYTES};
use serde::Serialize;

#[derive(Serialize)]
pub struct AgentView {
    name: String,
    role: String,
    version: String,
    host: String,
    connected: bool,
    last_seen: String,
    running: u32,
    load: u32,
    capabilities: Vec<Capability>,
}

/// Connected agents with their live figures, then the ones seen before and gone.
pub async fn list(State(state): State<AppState>) -> Result<Json<Vec<AgentView>>, ApiError> {
    let live = state.hub.connected();
    let mut views: Vec<AgentView> = live
        .iter()
        .map(|a| AgentView {
            name: a.name.clone(),
            role: a.role.to_string(),
            version: a.version.clone(),
            host: a.host.clone(),
            connected: true,
            last_seen: rfc3339(a.last_seen),
            running: a.running,
            load: a.load,
            capabilities: a.capabilities.clone(),
        })
        .collect();
    for row in state.db.agents().await? {
        if live.iter().any(|a| a.name == row.name) {
            continue;
        }
        views.push(AgentView {
            name: row.name,
            role: row.role,
            version: row.version,
            host: row.host,
            connected: false,
            last_seen: rfc3339(row.last_seen),
            running: row.running,
            load: 0,
            capabilities: Vec::new(),
        });
    }
    Ok(Json(views))
}

pub async fn socket(
    State(state): State<AppState>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let Ok(upgrade) = upgrade else {
        return super::websocket_required();
    };
    let hub = state.hub.clone();
    upgrade
        .max_message_size(MAX_FRAME_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        // Tracked, so the server closes the database only after every connection has
        // recorded its end.
        .on_upgrade(move |socket| state.connections.track_future(serve_agent(hub, socket)))
}

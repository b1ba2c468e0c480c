//! `GET /api/agents`, the agents' WebSocket, and the deployment log WebSocket.

use super::{AppState, rfc3339};
use crate::error::ApiError;
use crate::hub::serve_agent;
use axum::Json;
use axum::extract::State;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::response::Response;
use sdp_api::{Agent, ErrorBody};
use sdp_protocol::{Capability, MAX_FRAME_BYTES};

/// Connected agents with their live figures, then the ones seen before and gone.
#[utoipa::path(
    get,
    path = "/api/agents",
    operation_id = "list_agents",
    tag = "agents",
    responses((status = 200, description = "The agents", body = Vec<Agent>))
)]
pub async fn list(State(state): State<AppState>) -> Result<Json<Vec<Agent>>, ApiError> {
    let live = state.dispatch.connected().await;
    let mut views: Vec<Agent> = live
        .iter()
        .map(|a| Agent {
            name: a.name.clone(),
            role: a.role.to_string(),
            version: a.version.clone(),
            host: a.host.clone(),
            connected: true,
            last_seen: rfc3339(a.last_seen),
            running: a.running,
            load: a.load,
            capabilities: a
                .capabilities
                .iter()
                .map(|c| capability(*c).to_owned())
                .collect(),
        })
        .collect();
    for row in state.db.agents().await? {
        if live.iter().any(|a| a.name == row.name) {
            continue;
        }
        views.push(Agent {
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

/// The agents' WebSocket (SPEC §2): for `sdp agent` only, which presents the agent token.
/// Its frames are the agent protocol's (`sdp-protocol`), not this API's.
#[utoipa::path(
    get,
    path = "/ws/agent",
    operation_id = "agent_socket",
    tag = "agents",
    responses(
        (status = 101, description = "Switching to the agent protocol's WebSocket"),
        (status = 400, description = "`websocket_required`: not a WebSocket upgrade request", body = ErrorBody),
    )
)]
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

/// A capability as the agent said it.
fn capability(c: Capability) -> &'static str {
    match c {
        Capability::Git => "git",
        Capability::RuntimeDocker => "runtime_docker",
        Capability::RuntimeProcess => "runtime_process",
        Capability::RuntimeKubernetes => "runtime_kubernetes",
        Capability::Router => "router",
        Capability::Unknown => "unknown",
    }
}

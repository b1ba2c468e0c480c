//! Deployments: read, list, the log as text, and the live log WebSocket (SPEC §4.4, §11).

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use futures_util::SinkExt;
use sdp_api::{Deployment, DeploymentService, ErrorBody, ListParams, Page, StepInfo};
use serde::Deserialize;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};

use super::sandboxes::{SANDBOX_KEY, cursor, list_query, load as load_sandbox};
use super::{AppState, rfc3339};
use crate::db::{DeploymentRow, ListQuery};
use crate::error::ApiError;
use crate::logs::{Frame, FrameLog, Line, LogReader};
use crate::metrics::LogKind;

pub(crate) fn deployment_view(row: DeploymentRow) -> Deployment {
    Deployment {
        id: row.id.to_string(),
        sandbox_id: row.sandbox_id.to_string(),
        requested_by: row.requested_by,
        state: row.state.to_string(),
        error: row.error,
        created_at: rfc3339(row.created_at),
        finished_at: row.finished_at.map(rfc3339),
        agent: row.agent.map(|a| a.to_string()),
        steps: None,
        services: row
            .services
            .into_iter()
            .map(|s| DeploymentService {
                service: s.service,
                branch: s.branch,
                commit: s.commit,
                step: s.step.as_str().to_owned(),
                state: s.state.as_str().to_owned(),
            })
            .collect(),
    }
}

async fn load(state: &AppState, id: &str) -> Result<DeploymentRow, ApiError> {
    state.db.deployment(id).await?.ok_or_else(|| {
        ApiError::not_found(
            "unknown_deployment",
            format!(
                "there is no deployment {:?}",
                id.chars().take(80).collect::<String>()
            ),
        )
    })
}

/// A deployment, with its agent and every step's start and end.
#[utoipa::path(
    get,
    path = "/api/deployments/{id}",
    operation_id = "get_deployment",
    tag = "deployments",
    params(("id" = String, Path, description = "The deployment's id (`dep_…`)")),
    responses(
        (status = 200, description = "The deployment, with `steps`", body = Deployment),
        (status = 404, description = "`unknown_deployment`", body = ErrorBody),
    )
)]
pub async fn get(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Deployment>, ApiError> {
    let mut view = deployment_view(load(&state, &id).await?);
    let steps = state.db.steps(&id).await?;
    view.steps = Some(
        steps
            .into_iter()
            .map(|s| StepInfo {
                service: s.service,
                step: s.step.as_str().to_owned(),
                state: s.state.as_str().to_owned(),
                started_at: rfc3339(s.started_at),
                ended_at: s.ended_at.map(rfc3339),
            })
            .collect(),
    );
    Ok(Json(view))
}

/// Deployments, newest first, a page at a time.
#[utoipa::path(
    get,
    path = "/api/deployments",
    operation_id = "list_deployments",
    tag = "deployments",
    params(ListParams),
    responses(
        (status = 200, description = "A page of deployments (without `steps`)", body = Page<Deployment>),
        (status = 400, description = "`invalid_query`, `invalid_state`, `invalid_limit` or `invalid_cursor`", body = ErrorBody),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<Page<Deployment>>, ApiError> {
    let Query(params) =
        params.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let q = list_query(params, crate::db::DeploymentState::ALL)?;
    page_of(&state, &q).await
}

async fn page_of(state: &AppState, q: &ListQuery) -> Result<Json<Page<Deployment>>, ApiError> {
    let rows = state.db.list_deployments(q).await?;
    let next = (rows.len() == q.limit as usize)
        .then(|| rows.last().map(|r| cursor(r.created_at, r.id.as_str())))
        .flatten();
    let items: Vec<Deployment> = rows.into_iter().map(deployment_view).collect();
    Ok(Json(Page { items, next }))
}

/// A sandbox's deployments, newest first, a page at a time.
#[utoipa::path(
    get,
    path = "/api/sandboxes/{id}/deployments",
    operation_id = "sandbox_deployments",
    tag = "deployments",
    params(("id" = String, Path, description = SANDBOX_KEY, example = "demo"), ListParams),
    responses(
        (status = 200, description = "A page of the sandbox's deployments (without `steps`)", body = Page<Deployment>),
        (status = 400, description = "`invalid_query`, `invalid_state`, `invalid_limit` or `invalid_cursor`", body = ErrorBody),
        (status = 404, description = "`unknown_sandbox`", body = ErrorBody),
    )
)]
pub async fn of_sandbox(
    State(state): State<AppState>,
    Path(key): Path<String>,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<Page<Deployment>>, ApiError> {
    let Query(params) =
        params.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let mut q = list_query(params, crate::db::DeploymentState::ALL)?;
    let sandbox = load_sandbox(&state, &key).await?;
    q.sandbox = Some(sandbox.id.to_string());
    page_of(&state, &q).await
}

/// One frame as a line for people.
pub(super) fn render(frame: &Frame) -> String {
    match frame {
        Frame::Log {
            ts,
            service,
            stream,
            line,
            ..
        } => format!(
            "{ts} [{}/{stream}] {line}",
            service.as_deref().unwrap_or("sdp")
        ),
        Frame::Step {
            ts,
            service,
            step,
            state,
            ..
        } => format!(
            "{ts} [{}] step {step}: {state}",
            service.as_deref().unwrap_or("sdp")
        ),
        Frame::Instance {
            ts,
            service,
            state,
            reason,
            restarts,
            ..
        } => {
            let reason = reason
                .as_deref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default();
            format!("{ts} [{service}] instance {state}{reason} (restarts: {restarts})")
        }
        Frame::End {
            ts, state, error, ..
        } => match error {
            Some(e) => format!("{ts} deployment {state}: {e}"),
            None => format!("{ts} deployment {state}"),
        },
    }
}

/// The whole log as text, streamed: read and rendered a chunk at a time, so a long log costs
/// no more memory than a short one.
#[utoipa::path(
    get,
    path = "/api/deployments/{id}/logs",
    operation_id = "deployment_log",
    tag = "deployments",
    params(("id" = String, Path, description = "The deployment's id (`dep_…`)")),
    responses(
        (status = 200, description = "The deployment's log, one line per frame", content_type = "text/plain", body = String),
        (status = 404, description = "`unknown_deployment`", body = ErrorBody),
    )
)]
pub async fn logs(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    load(&state, &id).await?;
    let reader = state
        .lifecycle
        .logs()
        .reader(&id, 1)
        .await
        .map_err(|e| ApiError::internal("read log", &e))?;
    Ok(text_body(reader, id, |_| true))
}

/// A log's frames from `reader` that `keep` takes, as a streamed text/plain body.
pub(super) fn text_body(
    reader: LogReader,
    id: String,
    keep: impl Fn(&Frame) -> bool + Clone + Send + Sync + 'static,
) -> Response {
    let chunks = futures_util::stream::unfold(Some(reader), move |reader| {
        let (id, keep) = (id.clone(), keep.clone());
        async move {
            let mut reader = reader?;
            match reader.next_batch().await {
                Ok(batch) if batch.is_empty() => None,
                Ok(batch) => {
                    let mut text = String::new();
                    for line in batch {
                        if let Ok(frame) = serde_json::from_str::<Frame>(&line.json)
                            && keep(&frame)
                        {
                            text.push_str(&render(&frame));
                            text.push('\n');
                        }
                    }
                    Some((Ok(text), Some(reader)))
                }
                Err(e) => {
                    // The status went out with the first chunk: the body ends short.
                    tracing::error!(log = %id, error = %e, "cannot read the log");
                    Some((Err(e), None))
                }
            }
        }
    });
    (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        Body::from_stream(chunks),
    )
        .into_response()
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SocketParams {
    /// The first `seq` to send; 1 when absent.
    from: Option<u64>,
}

/// The deployment's log live: the stored frames from `from`, then the live ones, then the
/// `end` frame, each a JSON text frame (the `Frame` schema).
#[utoipa::path(
    get,
    path = "/ws/deployments/{id}",
    operation_id = "deployment_log_socket",
    tag = "deployments",
    params(("id" = String, Path, description = "The deployment's id (`dep_…`)"), SocketParams),
    responses(
        (status = 101, description = "Switching to the WebSocket of the deployment's frames"),
        (status = 400, description = "`invalid_query`, or `websocket_required`: not a WebSocket upgrade request", body = ErrorBody),
        (status = 404, description = "`unknown_deployment`", body = ErrorBody),
    )
)]
pub async fn socket(
    State(state): State<AppState>,
    Path(id): Path<String>,
    params: Result<Query<SocketParams>, QueryRejection>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let Query(params) =
        params.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    load(&state, &id).await?;
    let Ok(upgrade) = upgrade else {
        return Ok(super::websocket_required());
    };
    let from = params.from.unwrap_or(1).max(1);
    let connections = state.connections.clone();
    Ok(upgrade.on_upgrade(move |socket| {
        connections.track_future(async move {
            let _viewing = state.metrics.viewing(LogKind::Deployment);
            let logs = state.lifecycle.logs();
            let every = |_: &Line| true;
            if let Err(reason) = stream_log(logs, &id, from, socket, &state.shutdown, &every).await
            {
                tracing::debug!(deployment = %id, %reason, "log viewer left");
            }
        })
    }))
}

/// Replays the stored frames from `from`, then the live ones, up to and including the end
/// frame. A viewer that falls behind the live channel reads the file again from where it
/// was, so it sees every frame once, in order. Frames are written in bursts and flushed once
/// per burst: a flood of lines costs a few writes, not one per line. Only the frames `keep`
/// takes are sent (a runtime log's `?service=`); the end frame always is.
pub(super) async fn stream_log(
    logs: &dyn FrameLog,
    id: &str,
    from: u64,
    mut socket: WebSocket,
    shutdown: &tokio_util::sync::CancellationToken,
    keep: &(dyn Fn(&Line) -> bool + Sync),
) -> Result<(), String> {
    let mut next = from;
    // A finished deployment is all in its file; only a running one needs the live channel.
    if replay(logs, id, &mut next, &mut socket, keep).await? {
        return close(socket).await;
    }
    let mut live = logs.subscribe(id);
    loop {
        // Subscribed first, so whatever was written meanwhile is in the file.
        if replay(logs, id, &mut next, &mut socket, keep).await? {
            return close(socket).await;
        }
        let mut received = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            // Not only at the next write: a quiet log's viewer that left would hold its task
            // (and count as open) until then.
            left = viewer_left(&mut socket) => return Err(left),
            r = live.recv() => r.map_err(|e| match e {
                RecvError::Lagged(n) => TryRecvError::Lagged(n),
                RecvError::Closed => TryRecvError::Closed,
            }),
        };
        loop {
            match received {
                Ok(batch) => {
                    let mut gap = false;
                    for line in batch.iter() {
                        if line.seq < next {
                            continue;
                        }
                        if line.seq > next {
                            // A frame is missing (written before we subscribed): to the file.
                            gap = true;
                            break;
                        }
                        if line.end || keep(line) {
                            socket.feed(frame(line)).await.map_err(|e| e.to_string())?;
                        }
                        next += 1;
                        if line.end {
                            socket.flush().await.map_err(|e| e.to_string())?;
                            return close(socket).await;
                        }
                    }
                    if gap {
                        break;
                    }
                }
                Err(TryRecvError::Lagged(missed)) => {
                    tracing::debug!(deployment = %id, missed, "log viewer lagged; catching up from the file");
                    break;
                }
                Err(TryRecvError::Closed) => {
                    live = logs.subscribe(id);
                    break;
                }
                Err(TryRecvError::Empty) => break,
            }
            received = live.try_recv();
        }
        socket.flush().await.map_err(|e| e.to_string())?;
    }
}

/// Resolves once the viewer has closed its side, or its connection failed; what else it
/// sends means nothing and is dropped.
async fn viewer_left(socket: &mut WebSocket) -> String {
    loop {
        match socket.recv().await {
            None | Some(Ok(Message::Close(_))) => return "the viewer closed the socket".into(),
            Some(Err(e)) => return e.to_string(),
            Some(Ok(_)) => {}
        }
    }
}

/// Sends the stored frames from `next` on, a chunk of the file at a time; true once the end
/// frame went out.
async fn replay(
    logs: &dyn FrameLog,
    id: &str,
    next: &mut u64,
    socket: &mut WebSocket,
    keep: &(dyn Fn(&Line) -> bool + Sync),
) -> Result<bool, String> {
    let mut reader = logs.reader(id, *next).await.map_err(|e| e.to_string())?;
    loop {
        let batch = reader.next_batch().await.map_err(|e| e.to_string())?;
        if batch.is_empty() {
            return Ok(false);
        }
        for line in &batch {
            if line.end || keep(line) {
                socket.feed(frame(line)).await.map_err(|e| e.to_string())?;
            }
            *next = line.seq + 1;
            if line.end {
                socket.flush().await.map_err(|e| e.to_string())?;
                return Ok(true);
            }
        }
        socket.flush().await.map_err(|e| e.to_string())?;
    }
}

async fn close(mut socket: WebSocket) -> Result<(), String> {
    let _ = socket.send(Message::Close(None)).await;
    Ok(())
}

fn frame(line: &Line) -> Message {
    Message::Text(line.json.clone())
}

//! A sandbox's runtime log (its services' output after ready, and their state changes) as
//! text and as a live WebSocket, and its history (SPEC §11).

use std::collections::VecDeque;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use sdp_api::{ErrorBody, HistoryEntry};
use sdp_protocol::ServiceName;
use serde::Deserialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::deployments::{render, stream_log, text_body};
use super::sandboxes::{SANDBOX_KEY, load};
use super::{AppState, rfc3339};
use crate::error::ApiError;
use crate::logs::{Frame, FrameLog, Line};
use crate::metrics::LogKind;

/// The most lines `tail` may ask for.
const MAX_TAIL: usize = 100_000;

/// The most history entries answered: the newest ones.
const MAX_HISTORY: u32 = 1000;

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LogParams {
    /// Only this catalog service's lines.
    #[param(example = "orders")]
    service: Option<String>,
    /// Only lines from this time on: an RFC 3339 time, or a duration back from now (`10m`).
    #[param(example = "10m")]
    since: Option<String>,
    /// Only the last this many lines.
    #[param(value_type = Option<u32>, minimum = 0, maximum = 100_000)]
    tail: Option<String>,
}

/// Which frames a reader wants.
#[derive(Clone)]
struct Filter {
    service: Option<String>,
    since: Option<OffsetDateTime>,
}

impl Filter {
    fn keeps(&self, frame: &Frame) -> bool {
        let (service, ts) = match frame {
            Frame::Log { service, ts, .. } | Frame::Step { service, ts, .. } => {
                (service.as_deref(), ts)
            }
            Frame::Instance { service, ts, .. } => (Some(service.as_str()), ts),
            Frame::End { ts, .. } => (None, ts),
        };
        if self.service.is_some() && service != self.service.as_deref() {
            return false;
        }
        match self.since {
            Some(since) => OffsetDateTime::parse(ts, &Rfc3339).is_ok_and(|t| t >= since),
            None => true,
        }
    }

    fn keeps_line(&self, line: &Line) -> bool {
        serde_json::from_str::<Frame>(&line.json).is_ok_and(|f| self.keeps(&f))
    }
}

fn clip(raw: &str) -> String {
    raw.chars().take(60).collect()
}

/// `service` must be one of the catalog's.
fn service_filter(state: &AppState, raw: Option<String>) -> Result<Option<String>, ApiError> {
    let Some(raw) = raw else { return Ok(None) };
    let known = ServiceName::parse(raw.clone())
        .ok()
        .is_some_and(|name| state.config.services.iter().any(|s| s.name == name));
    if !known {
        return Err(ApiError::bad_request(
            "invalid_service",
            format!("service {:?} is not in the catalog", clip(&raw)),
        ));
    }
    Ok(Some(raw))
}

/// `since`: an RFC 3339 time, or a duration back from now like `10m` or `2h`.
fn since_filter(raw: Option<String>) -> Result<Option<OffsetDateTime>, ApiError> {
    let Some(raw) = raw else { return Ok(None) };
    if let Ok(t) = OffsetDateTime::parse(&raw, &Rfc3339) {
        return Ok(Some(t));
    }
    match raw.parse::<sdp_config::ConfigDuration>() {
        Ok(d) => Ok(Some(OffsetDateTime::now_utc() - d.get())),
        Err(_) => Err(ApiError::bad_request(
            "invalid_since",
            format!(
                "since {:?} is neither an RFC 3339 time (2026-01-02T15:04:05Z) nor a duration like \"10m\"",
                clip(&raw)
            ),
        )),
    }
}

fn tail_count(raw: Option<String>) -> Result<Option<usize>, ApiError> {
    let Some(raw) = raw else { return Ok(None) };
    match raw.parse::<usize>() {
        Ok(n) if n <= MAX_TAIL => Ok(Some(n)),
        _ => Err(ApiError::bad_request(
            "invalid_tail",
            format!(
                "tail {:?} is not a number of lines from 0 to {MAX_TAIL}",
                clip(&raw)
            ),
        )),
    }
}

fn text(body: String) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response()
}

/// `GET /api/sandboxes/{id}/logs?service=&since=&tail=`: the runtime log as text.
#[utoipa::path(
    get,
    path = "/api/sandboxes/{id}/logs",
    operation_id = "sandbox_log",
    tag = "sandboxes",
    params(("id" = String, Path, description = SANDBOX_KEY, example = "demo"), LogParams),
    responses(
        (status = 200, description = "The runtime log (its services' output after ready, and their state changes), one line per frame; empty once the sandbox has ended", content_type = "text/plain", body = String),
        (status = 400, description = "`invalid_query`, `invalid_service`, `invalid_since` or `invalid_tail`", body = ErrorBody),
        (status = 404, description = "`unknown_sandbox`", body = ErrorBody),
    )
)]
pub async fn logs(
    State(state): State<AppState>,
    Path(key): Path<String>,
    params: Result<Query<LogParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(params) =
        params.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let filter = Filter {
        service: service_filter(&state, params.service)?,
        since: since_filter(params.since)?,
    };
    let tail = tail_count(params.tail)?;
    let row = load(&state, &key).await?;
    // An ended sandbox's runtime log was deleted with it.
    if row.state.has_ended() {
        return Ok(text(String::new()));
    }
    let id = row.id.to_string();
    let mut reader = state
        .lifecycle
        .runtime_logs()
        .reader(&id, 1)
        .await
        .map_err(|e| ApiError::internal("read runtime log", &e))?;
    let Some(tail) = tail else {
        return Ok(text_body(reader, id, move |f| filter.keeps(f)));
    };
    // The last `tail` lines that pass the filter; the log is bounded by its rotation.
    let mut last: VecDeque<String> = VecDeque::with_capacity(tail.min(1024));
    loop {
        let batch = reader
            .next_batch()
            .await
            .map_err(|e| ApiError::internal("read runtime log", &e))?;
        if batch.is_empty() {
            break;
        }
        for line in batch {
            if let Ok(frame) = serde_json::from_str::<Frame>(&line.json)
                && filter.keeps(&frame)
                && tail > 0
            {
                if last.len() == tail {
                    last.pop_front();
                }
                last.push_back(render(&frame));
            }
        }
    }
    let mut body = String::new();
    for line in last {
        body.push_str(&line);
        body.push('\n');
    }
    Ok(text(body))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SocketParams {
    /// The first `seq` to send.
    from: Option<u64>,
    /// Only this catalog service's frames.
    #[param(example = "orders")]
    service: Option<String>,
    /// Without `from`: start with the last this many frames.
    #[param(value_type = Option<u32>, minimum = 0, maximum = 100_000)]
    tail: Option<String>,
}

/// The `seq` to replay from for the last `tail` frames that pass `filter`: a viewer (the
/// dashboard) wants the recent past, not a whole rotated log of up to twice its cap.
async fn tail_start(
    state: &AppState,
    id: &str,
    filter: &Filter,
    tail: usize,
) -> Result<u64, ApiError> {
    let mut reader = state
        .lifecycle
        .runtime_logs()
        .reader(id, 1)
        .await
        .map_err(|e| ApiError::internal("read runtime log", &e))?;
    let mut kept: VecDeque<u64> = VecDeque::with_capacity(tail.min(1024));
    let mut next = 1;
    loop {
        let batch = reader
            .next_batch()
            .await
            .map_err(|e| ApiError::internal("read runtime log", &e))?;
        if batch.is_empty() {
            break;
        }
        for line in batch {
            next = line.seq + 1;
            if tail > 0 && filter.keeps_line(&line) {
                if kept.len() == tail {
                    kept.pop_front();
                }
                kept.push_back(line.seq);
            }
        }
    }
    Ok(kept.front().copied().unwrap_or(next))
}

/// `/ws/sandboxes/{id}/logs?from=&service=&tail=`: the stored frames from `from` (or, without
/// `from`, the last `tail` of them), then the live ones, as `/ws/deployments/{id}` does; the
/// last frame is `end` when the sandbox ends.
#[utoipa::path(
    get,
    path = "/ws/sandboxes/{id}/logs",
    operation_id = "sandbox_log_socket",
    tag = "sandboxes",
    params(("id" = String, Path, description = SANDBOX_KEY, example = "demo"), SocketParams),
    responses(
        (status = 101, description = "Switching to the WebSocket of the runtime log's frames (the `Frame` schema)"),
        (status = 400, description = "`invalid_query`, `invalid_service`, `invalid_tail`, or `websocket_required`: not a WebSocket upgrade request", body = ErrorBody),
        (status = 404, description = "`unknown_sandbox`", body = ErrorBody),
    )
)]
pub async fn socket(
    State(state): State<AppState>,
    Path(key): Path<String>,
    params: Result<Query<SocketParams>, QueryRejection>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let Query(params) =
        params.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let filter = Filter {
        service: service_filter(&state, params.service)?,
        since: None,
    };
    let tail = tail_count(params.tail)?;
    let row = load(&state, &key).await?;
    let Ok(upgrade) = upgrade else {
        return Ok(super::websocket_required());
    };
    let from = match (params.from, tail) {
        (Some(from), _) => from.max(1),
        (None, Some(tail)) if !row.state.has_ended() => {
            tail_start(&state, row.id.as_ref(), &filter, tail).await?
        }
        (None, _) => 1,
    };
    let connections = state.connections.clone();
    let (id, ended) = (row.id.to_string(), row.state);
    Ok(upgrade.on_upgrade(move |mut socket| {
        connections.track_future(async move {
            let _viewing = state.metrics.viewing(LogKind::Runtime);
            if ended.has_ended() {
                let end = Frame::End {
                    seq: from,
                    ts: rfc3339(OffsetDateTime::now_utc()),
                    state: ended.to_string(),
                    error: None,
                };
                let json = serde_json::to_string(&end).expect("frames serialize");
                let _ = futures_util::SinkExt::send(&mut socket, Message::Text(json.into())).await;
                let _ = futures_util::SinkExt::send(&mut socket, Message::Close(None)).await;
                return;
            }
            let logs: &dyn FrameLog = state.lifecycle.runtime_logs();
            let keep = move |line: &Line| filter.keeps_line(line);
            if let Err(reason) = stream_log(logs, &id, from, socket, &state.shutdown, &keep).await {
                tracing::debug!(sandbox = %id, %reason, "runtime log viewer left");
            }
        })
    }))
}

/// `GET /api/sandboxes/{id}/history`: the sandbox's audit rows, oldest first.
#[utoipa::path(
    get,
    path = "/api/sandboxes/{id}/history",
    operation_id = "sandbox_history",
    tag = "sandboxes",
    params(("id" = String, Path, description = SANDBOX_KEY, example = "demo")),
    responses(
        (status = 200, description = "At most the newest 1000 rows, oldest first", body = Vec<HistoryEntry>),
        (status = 404, description = "`unknown_sandbox`", body = ErrorBody),
    )
)]
pub async fn history(
    State(state): State<AppState>,
    Path(key): Path<String>,
) -> Result<Json<Vec<HistoryEntry>>, ApiError> {
    let row = load(&state, &key).await?;
    let rows = state.db.sandbox_history(&row.id, MAX_HISTORY).await?;
    Ok(Json(
        rows.into_iter()
            .map(|r| HistoryEntry {
                at: rfc3339(r.at),
                actor: r.actor,
                action: r.action,
                detail: r.detail,
            })
            .collect(),
    ))
}

//! The service catalog and its branches (SPEC §4.2).

use axum::Extension;
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use sdp_protocol::{Branch, JobError, JobErrorCode, JobKind, JobOutput, Role};
use serde::Serialize;
use time::OffsetDateTime;

use super::{AppState, CurrentSession};
use crate::error::ApiError;
use crate::hub::CallError;

#[derive(Serialize)]
pub struct ServiceView {
    name: String,
    repo: String,
    routes: Vec<String>,
    baseline: String,
}

pub async fn services(State(state): State<AppState>) -> Json<Vec<ServiceView>> {
    Json(
        state
            .config
            .services
            .iter()
            .map(|s| ServiceView {
                name: s.name.to_string(),
                repo: s.repo.to_string(),
                routes: s.routes.clone(),
                baseline: s.baseline.clone(),
            })
            .collect(),
    )
}

pub async fn branches(
    State(state): State<AppState>,
    Extension(session): Extension<CurrentSession>,
    Path(name): Path<String>,
) -> Result<Json<Vec<Branch>>, ApiError> {
    let service = state.config.service(&name).ok_or_else(|| {
        ApiError::not_found(
            "unknown_service",
            format!(
                "there is no service {:?} in the catalog",
                name.chars().take(80).collect::<String>()
            ),
        )
    })?;
    let credentials = state
        .vault
        .credentials(&session.token_hash, OffsetDateTime::now_utc())
        .ok_or_else(reauth_required)?;
    let job = JobKind::ListBranches {
        repo: service.repo.clone(),
        credentials,
    };
    let output = state
        .hub
        .call(Role::Micro, job, state.config.job_timeout.get())
        .await
        .map_err(call_error)?
        .1;
    match output {
        JobOutput::Branches { mut branches } => {
            branches.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(Json(branches))
        }
        JobOutput::Failed(e) => Err(job_error(e, &format!("the repository of {name}"))),
        other => Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            "agent_error",
            format!("the agent answered the branch list with {other:?}"),
        )),
    }
}

/// After a control plane restart the session is still valid but the password is gone.
pub(crate) fn reauth_required() -> ApiError {
    ApiError::unauthorized(
        "reauth_required",
        "SDP no longer holds your Bitbucket password (the server restarted); log in again",
    )
}

pub(crate) fn call_error(e: CallError) -> ApiError {
    match e {
        CallError::NoAgent(role) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_agent",
            format!(
                "no {role} agent is connected, so SDP cannot reach git right now; start `sdp agent --role {role}` or try again shortly"
            ),
        ),
        CallError::Timeout { .. } => ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "agent_timeout",
            format!("{e}; try again"),
        ),
        CallError::Disconnected { .. } | CallError::NotConnected(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "agent_disconnected",
            format!("{e}; try again"),
        ),
        CallError::BadReply { .. } => {
            ApiError::new(StatusCode::BAD_GATEWAY, "agent_error", e.to_string())
        }
        CallError::JobTooLarge { .. } => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "job_too_large",
            e.to_string(),
        ),
    }
}

/// Maps a failed git job to an API error; `what` names the repository for the message.
pub(crate) fn job_error(e: JobError, what: &str) -> ApiError {
    match e.code {
        JobErrorCode::AuthFailed => ApiError::new(
            StatusCode::FORBIDDEN,
            "repo_access_denied",
            format!("Bitbucket refused your credentials for {what}"),
        ),
        JobErrorCode::RepoUnreachable => ApiError::new(
            StatusCode::BAD_GATEWAY,
            "repo_unreachable",
            format!("{what} cannot be reached: {}", e.message),
        ),
        JobErrorCode::Timeout => ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "git_timeout",
            format!("git did not answer in time for {what}"),
        ),
        JobErrorCode::Failed | JobErrorCode::Unsupported => ApiError::new(
            StatusCode::BAD_GATEWAY,
            "git_failed",
            format!("git failed for {what}: {}", e.message),
        ),
    }
}

//! The service catalog and its branches (SPEC §4.2).

use axum::Extension;
use axum::Json;
use axum::extract::{Path, State};
use sdp_api::{ErrorBody, Service};
use sdp_protocol::{Branch, ListBranches, Role};
use time::OffsetDateTime;

use super::{AppState, CurrentSession};
use crate::dispatch::{Target, call};
use crate::error::{ApiError, Asked, agent_error};

/// The service catalog.
#[utoipa::path(
    get,
    path = "/api/services",
    operation_id = "list_services",
    tag = "catalog",
    responses((status = 200, description = "Every service of the catalog", body = Vec<Service>))
)]
pub async fn services(State(state): State<AppState>) -> Json<Vec<Service>> {
    Json(
        state
            .config
            .services
            .iter()
            .map(|s| Service {
                name: s.name.to_string(),
                repo: s.repo.to_string(),
                routes: s.routes.clone(),
                baseline: s.baseline.clone(),
                kind: s.kind.as_str().to_owned(),
            })
            .collect(),
    )
}

/// A service's branches, from `git ls-remote --heads` on a micro agent with the caller's
/// credentials, sorted by name.
#[utoipa::path(
    get,
    path = "/api/services/{name}/branches",
    operation_id = "list_branches",
    tag = "catalog",
    params(("name" = String, Path, description = "A service of the catalog", example = "orders")),
    responses(
        (status = 200, description = "The branches and their tips", body = Vec<sdp_protocol::Branch>),
        (status = 401, description = "`reauth_required`: the control plane restarted and no longer holds the password; log in again", body = ErrorBody),
        (status = 403, description = "`repo_access_denied`: Bitbucket refused the caller's credentials for this repository", body = ErrorBody),
        (status = 404, description = "`unknown_service`", body = ErrorBody),
        (status = 502, description = "`agent_error`, `repo_unreachable` or `git_failed`", body = ErrorBody),
        (status = 503, description = "`no_agent` or `agent_disconnected`: no micro agent to ask", body = ErrorBody),
        (status = 504, description = "`agent_timeout` or `git_timeout`: no answer within `job_timeout`", body = ErrorBody),
    )
)]
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
    let job = ListBranches {
        repo: service.repo.clone(),
        credentials,
    };
    let (_, mut branches) = call(
        state.dispatch.as_ref(),
        Target::Any(Role::Micro),
        job,
        state.config.job_timeout.get(),
    )
    .await
    .map_err(|e| agent_error(e, Asked::Git(&format!("the repository of {name}"))))?;
    branches.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Json(branches))
}

/// After a control plane restart the session is still valid but the password is gone.
pub(crate) fn reauth_required() -> ApiError {
    ApiError::unauthorized(
        "reauth_required",
        "SDP no longer holds your Bitbucket password (the server restarted); log in again",
    )
}

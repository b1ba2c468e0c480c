//! The service catalog and its branches (SPEC §4.2).

use axum::Extension;
use axum::Json;
use axum::extract::{Path, State};
use sdp_api::Service;
use sdp_protocol::{Branch, ListBranches, Role};
use time::OffsetDateTime;

use super::{AppState, CurrentSession};
use crate::dispatch::{Target, call};
use crate::error::{ApiError, Asked, agent_error};

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

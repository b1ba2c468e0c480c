//! Sandboxes: create, redeploy, read, list, delete, extend, wake (SPEC §4.3, §4.6, §11).

use std::collections::HashSet;
use std::time::Duration;

use axum::Extension;
use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use sdp_api::{
    Accepted, CreateSandbox, Deployment, ErrorBody, Extend, ListParams, Page, PendingCommit,
    Redeploy, Sandbox, SandboxService, Selection, ServicePatch,
};
use sdp_protocol::{BranchName, SandboxName, ServiceName, ServiceSpec};
use time::OffsetDateTime;

use super::deployments::deployment_view;
use super::{AppState, CurrentSession, rfc3339};
use crate::db::{Ending, ListQuery, SandboxRow, SandboxState, WriteError};
use crate::dispatch::{Target, call};
use crate::error::{ApiError, ApiJson, Asked, agent_error};
use crate::lifecycle::Request;

/// At most this many services in one request.
pub const MAX_SERVICES: usize = 16;
/// The longest a sandbox may be given at once.
pub const MAX_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// What a path's `{id}` may be, in the API document.
pub(super) const SANDBOX_KEY: &str = "The sandbox's id (`sbx_…`) or its name";

/// A live sandbox this close to its expiry is shown as expiring soon.
const EXPIRY_WARNING: time::Duration = time::Duration::hours(1);

/// `<scheme>://<sandbox>.<base_domain>[:port]` of the gateway's public URL.
fn sandbox_url(state: &AppState, name: &str) -> String {
    let gateway = &state.config.gateway;
    match url::Url::parse(&gateway.public_url) {
        Ok(u) => {
            let port = u.port().map(|p| format!(":{p}")).unwrap_or_default();
            format!("{}://{name}.{}{port}", u.scheme(), gateway.base_domain)
        }
        Err(_) => format!("http://{name}.{}", gateway.base_domain),
    }
}

pub(crate) fn sandbox_view(state: &AppState, row: SandboxRow) -> Sandbox {
    Sandbox {
        url: sandbox_url(state, row.name.as_str()),
        id: row.id.to_string(),
        name: row.name.to_string(),
        owner: row.owner,
        state: row.state.to_string(),
        created_at: rfc3339(row.created_at),
        expires_at: rfc3339(row.expires_at),
        expires_soon: !row.state.has_ended()
            && row.expires_at - OffsetDateTime::now_utc() <= EXPIRY_WARNING,
        services: row
            .services
            .into_iter()
            .map(|s| SandboxService {
                service: s.service,
                branch: s.branch,
                commit: s.commit,
                state: s.state.to_string(),
                upstream: s.upstream,
                reason: s.reason,
                restarts: s.restarts,
                last_lines: s.last_lines,
                follow: s.follow,
                pending: s
                    .pending
                    .map(|(commit, reason)| PendingCommit { commit, reason }),
            })
            .collect(),
    }
}

fn parse_ttl(raw: &str) -> Result<Duration, ApiError> {
    let ttl = raw
        .parse::<sdp_config::ConfigDuration>()
        .map(|d| d.get())
        .map_err(|_| {
            ApiError::bad_request(
                "invalid_ttl",
                format!(
                    "ttl {:?} is not a duration like \"2h\" or \"3d\"",
                    raw.chars().take(40).collect::<String>()
                ),
            )
        })?;
    if ttl.is_zero() || ttl > MAX_TTL {
        return Err(ApiError::bad_request(
            "invalid_ttl",
            "ttl must be longer than zero and at most 30 days",
        ));
    }
    Ok(ttl)
}

/// Checks the requested services against the catalog and git's rules, into deploy specs.
fn specs(state: &AppState, services: &[Selection]) -> Result<Vec<ServiceSpec>, ApiError> {
    if services.is_empty() {
        return Err(ApiError::bad_request(
            "no_services",
            "choose at least one service and branch",
        ));
    }
    if services.len() > MAX_SERVICES {
        return Err(ApiError::bad_request(
            "too_many_services",
            format!("at most {MAX_SERVICES} services can be deployed at once"),
        ));
    }
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(services.len());
    for s in services {
        let service = state.config.service(&s.service).ok_or_else(|| {
            ApiError::bad_request(
                "unknown_service",
                format!(
                    "there is no service {:?} in the catalog",
                    s.service.chars().take(80).collect::<String>()
                ),
            )
        })?;
        if !seen.insert(service.name.as_str()) {
            return Err(ApiError::bad_request(
                "duplicate_service",
                format!("service {} is listed twice", service.name),
            ));
        }
        let branch = BranchName::parse(s.branch.clone())
            .map_err(|e| ApiError::bad_request("invalid_branch", e.to_string()))?;
        out.push(service.spec(branch));
    }
    if out.iter().filter(|s| s.gateway.is_some()).count() > 1 {
        return Err(ApiError::bad_request(
            "two_gateways",
            "a sandbox runs at most one API gateway: choose one of the gateway services",
        ));
    }
    Ok(out)
}

pub(super) async fn load(state: &AppState, key: &str) -> Result<SandboxRow, ApiError> {
    state.db.sandbox(key).await?.ok_or_else(|| {
        ApiError::not_found(
            "unknown_sandbox",
            format!(
                "there is no sandbox {:?}",
                key.chars().take(80).collect::<String>()
            ),
        )
    })
}

/// Owners act on their own sandboxes; everyone can read.
fn require_owner(row: &SandboxRow, session: &CurrentSession) -> Result<(), ApiError> {
    if row.owner != session.username.as_str() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "not_owner",
            format!(
                "sandbox {} belongs to {}; only its owner can change it",
                row.name, row.owner
            ),
        ));
    }
    Ok(())
}

fn require_live(row: &SandboxRow) -> Result<(), ApiError> {
    if row.state.has_ended() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "sandbox_ended",
            format!("sandbox {} is {}; create it again", row.name, row.state),
        ));
    }
    Ok(())
}

/// The services whose following a request sets.
fn follow_of(requested: &[Selection]) -> std::collections::BTreeMap<ServiceName, bool> {
    requested
        .iter()
        .filter_map(|s| Some((ServiceName::parse(s.service.clone()).ok()?, s.follow?)))
        .collect()
}

/// `service@branch …` of a request, for the audit trail.
fn detail(requested: &[Selection]) -> String {
    requested
        .iter()
        .map(|s| format!("{}@{}", s.service, s.branch))
        .collect::<Vec<_>>()
        .join(" ")
}

async fn accepted(
    state: &AppState,
    sandbox_id: &str,
    deployment_id: &str,
) -> Result<Response, ApiError> {
    let sandbox = load(state, sandbox_id).await?;
    let deployment: Option<Deployment> = state
        .db
        .deployment(deployment_id)
        .await?
        .map(deployment_view);
    Ok((
        StatusCode::ACCEPTED,
        Json(Accepted {
            sandbox: sandbox_view(state, sandbox),
            deployment,
        }),
    )
        .into_response())
}

/// Creates a sandbox and its first deployment, which runs on after the answer.
#[utoipa::path(
    post,
    path = "/api/sandboxes",
    operation_id = "create_sandbox",
    tag = "sandboxes",
    request_body = CreateSandbox,
    responses(
        (status = 202, description = "Created; the deployment runs", body = Accepted),
        (status = 400, description = "`invalid_sandbox_name`, `no_services`, `too_many_services` (over 16), `unknown_service`, `duplicate_service`, `two_gateways` (more than one API gateway), `invalid_branch`, `invalid_ttl`, `invalid_json` or `invalid_request`", body = ErrorBody),
        (status = 401, description = "`reauth_required`: the control plane restarted and no longer holds the password; log in again", body = ErrorBody),
        (status = 409, description = "`sandbox_exists`: a live sandbox has this name", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: the body is over 1 MiB", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: the body is not sent as `application/json`", body = ErrorBody),
        (status = 507, description = "`insufficient_storage`: the control plane's disk is nearly full (`min_free_space`)", body = ErrorBody),
    )
)]
pub async fn create(
    State(state): State<AppState>,
    Extension(session): Extension<CurrentSession>,
    ApiJson(req): ApiJson<CreateSandbox>,
) -> Result<Response, ApiError> {
    let name = SandboxName::parse(req.name)
        .map_err(|e| ApiError::bad_request("invalid_sandbox_name", e.to_string()))?;
    let specs = specs(&state, &req.services)?;
    let ttl = match &req.ttl {
        Some(raw) => parse_ttl(raw)?,
        None => state.config.sandbox_ttl.get(),
    };
    let credentials = state
        .vault
        .credentials(&session.token_hash, OffsetDateTime::now_utc())
        .ok_or_else(super::catalog::reauth_required)?;
    require_free_space(&state).await?;

    let detail = detail(&req.services);
    let request = Request {
        requested_by: session.username.as_str(),
        specs,
        credentials,
        detail: &detail,
        follow: follow_of(&req.services),
    };
    let (sandbox_id, deployment_id) = state
        .lifecycle
        .create(name.clone(), OffsetDateTime::now_utc() + ttl, request)
        .await
        .map_err(|e| write_error(e, &name))?;
    accepted(&state, sandbox_id.as_str(), deployment_id.as_str()).await
}

/// Deploys the services it lists to the sandbox (the others keep running); its owner only.
#[utoipa::path(
    post,
    path = "/api/sandboxes/{id}/deploy",
    operation_id = "redeploy_sandbox",
    tag = "sandboxes",
    params(("id" = String, Path, description = SANDBOX_KEY, example = "demo")),
    request_body = Redeploy,
    responses(
        (status = 202, description = "Accepted; the deployment runs", body = Accepted),
        (status = 400, description = "`no_services`, `too_many_services` (over 16), `unknown_service`, `duplicate_service`, `two_gateways` (a second API gateway), `invalid_branch`, `invalid_json` or `invalid_request`", body = ErrorBody),
        (status = 401, description = "`reauth_required`: the control plane restarted and no longer holds the password; log in again", body = ErrorBody),
        (status = 403, description = "`not_owner`", body = ErrorBody),
        (status = 404, description = "`unknown_sandbox`", body = ErrorBody),
        (status = 409, description = "`deployment_in_progress` or `sandbox_ended`", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: the body is over 1 MiB", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: the body is not sent as `application/json`", body = ErrorBody),
        (status = 507, description = "`insufficient_storage`: the control plane's disk is nearly full (`min_free_space`)", body = ErrorBody),
    )
)]
pub async fn redeploy(
    State(state): State<AppState>,
    Extension(session): Extension<CurrentSession>,
    Path(key): Path<String>,
    ApiJson(req): ApiJson<Redeploy>,
) -> Result<Response, ApiError> {
    let sandbox = load(&state, &key).await?;
    require_owner(&sandbox, &session)?;
    require_live(&sandbox)?;
    let specs = specs(&state, &req.services)?;
    // The sandbox's gateway may be redeployed on another branch, not joined by a second one.
    if let Some(new) = specs.iter().find(|s| s.gateway.is_some())
        && let Some(running) = sandbox.services.iter().find(|s| {
            s.service != new.service.as_str()
                && state
                    .config
                    .service(&s.service)
                    .and_then(|c| c.gateway_spec())
                    .is_some()
        })
    {
        return Err(ApiError::bad_request(
            "two_gateways",
            format!(
                "sandbox {} runs the gateway {} already: a sandbox runs at most one API gateway",
                sandbox.name, running.service
            ),
        ));
    }
    let credentials = state
        .vault
        .credentials(&session.token_hash, OffsetDateTime::now_utc())
        .ok_or_else(super::catalog::reauth_required)?;
    require_free_space(&state).await?;
    let detail = detail(&req.services);
    let request = Request {
        requested_by: session.username.as_str(),
        specs,
        credentials,
        detail: &detail,
        follow: follow_of(&req.services),
    };
    let deployment_id = state
        .lifecycle
        .redeploy(&sandbox, request)
        .await
        .map_err(|e| write_error(e, &sandbox.name))?;
    accepted(&state, sandbox.id.as_str(), deployment_id.as_str()).await
}

/// Refuses a new deployment while the file system of `data_dir` has less free space than
/// `min_free_space` plus a full log (`max_log_size`) for each deployment in progress and for
/// this one: its log and rows might not fit, and SQLite or a log failing in the middle of a
/// deployment is worse than a clear refusal before it.
async fn require_free_space(state: &AppState) -> Result<(), ApiError> {
    let floor = state.config.min_free_space.get();
    if floor == 0 {
        return Ok(());
    }
    let active = state.db.active_deployments().await?;
    let min = floor.saturating_add(
        state
            .config
            .max_log_size
            .get()
            .saturating_mul(active.saturating_add(1)),
    );
    let dir = state.config.data_dir.clone();
    let free = tokio::task::spawn_blocking(move || {
        nix::sys::statvfs::statvfs(&dir)
            .map(|s| s.blocks_available().saturating_mul(s.fragment_size()))
    })
    .await
    .map_err(|e| ApiError::internal("free space", &e))?
    .map_err(|e| ApiError::internal("free space", &e))?;
    if free >= min {
        return Ok(());
    }
    tracing::warn!(free_bytes = free, min_free_space = %state.config.min_free_space, "deployment refused: the disk of the data directory is nearly full");
    Err(ApiError::new(
        StatusCode::INSUFFICIENT_STORAGE,
        "insufficient_storage",
        format!(
            "the control plane's disk has only {} free, less than the {} it keeps free (min_free_space) plus room for the logs of {} deployments (max_log_size each); no new deployment is taken until an operator frees space",
            mib(free),
            mib(floor),
            active + 1
        ),
    ))
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
}

fn write_error(e: WriteError, name: &SandboxName) -> ApiError {
    match e {
        WriteError::NameTaken => ApiError::new(
            StatusCode::CONFLICT,
            "sandbox_exists",
            format!(
                "a sandbox named {name} exists; redeploy it with POST /api/sandboxes/{name}/deploy"
            ),
        ),
        WriteError::Busy => ApiError::new(
            StatusCode::CONFLICT,
            "deployment_in_progress",
            format!("a deployment of {name} is in progress; wait for it to end, then deploy again"),
        ),
        WriteError::Ended => ApiError::new(
            StatusCode::CONFLICT,
            "sandbox_ended",
            format!("sandbox {name} has ended; create it again"),
        ),
        WriteError::Db(e) => e.into(),
    }
}

/// A sandbox with its services' states.
#[utoipa::path(
    get,
    path = "/api/sandboxes/{id}",
    operation_id = "get_sandbox",
    tag = "sandboxes",
    params(("id" = String, Path, description = SANDBOX_KEY, example = "demo")),
    responses(
        (status = 200, description = "The sandbox", body = Sandbox),
        (status = 404, description = "`unknown_sandbox`", body = ErrorBody),
    )
)]
pub async fn get(
    State(state): State<AppState>,
    Path(key): Path<String>,
) -> Result<Json<Sandbox>, ApiError> {
    let row = load(&state, &key).await?;
    Ok(Json(sandbox_view(&state, row)))
}

/// The route inspector: the gateway's last routing decisions for the sandbox, newest first.
#[utoipa::path(
    get,
    path = "/api/sandboxes/{id}/requests",
    operation_id = "sandbox_requests",
    tag = "sandboxes",
    params(("id" = String, Path, description = SANDBOX_KEY, example = "demo")),
    responses(
        (status = 200, description = "Up to the last 200 decisions (none once the sandbox has ended)", body = Vec<sdp_protocol::RouteDecision>),
        (status = 404, description = "`unknown_sandbox`", body = ErrorBody),
        (status = 502, description = "`agent_error`: the gateway agent could not say", body = ErrorBody),
        (status = 503, description = "`no_agent` or `agent_disconnected`: no gateway agent to ask", body = ErrorBody),
        (status = 504, description = "`agent_timeout`: no answer within `job_timeout`", body = ErrorBody),
    )
)]
pub async fn requests(
    State(state): State<AppState>,
    Path(key): Path<String>,
) -> Result<Json<Vec<sdp_protocol::RouteDecision>>, ApiError> {
    let row = load(&state, &key).await?;
    if row.state.has_ended() {
        // The router forgot it with its routes.
        return Ok(Json(Vec::new()));
    }
    let job = sdp_protocol::Requests { sandbox: row.name };
    let (_, requests) = call(
        state.dispatch.as_ref(),
        Target::Any(sdp_protocol::Role::Gateway),
        job,
        state.config.job_timeout.get(),
    )
    .await
    .map_err(|e| agent_error(e, Asked::Router))?;
    Ok(Json(requests))
}

/// Checks listing parameters into a query; `states` are the values `state` may take.
pub(crate) fn list_query<S: std::fmt::Display + Copy>(
    params: ListParams,
    states: &[S],
) -> Result<ListQuery, ApiError> {
    if let Some(s) = &params.state
        && !states.iter().any(|state| state.to_string() == *s)
    {
        let states: Vec<String> = states.iter().map(ToString::to_string).collect();
        return Err(ApiError::bad_request(
            "invalid_state",
            format!("state must be one of {}", states.join(", ")),
        ));
    }
    let (limit, after) = page_bounds(params.limit, params.cursor.as_deref(), parse_cursor)?;
    Ok(ListQuery {
        owner: params.owner,
        state: params.state,
        sandbox: None,
        limit,
        after,
    })
}

/// A listing's page size (default 50, at most 200) and the cursor it goes on after, read
/// with `parse`: one check, one message, for every paginated list.
pub(crate) fn page_bounds<C>(
    limit: Option<u32>,
    cursor: Option<&str>,
    parse: fn(&str) -> Option<C>,
) -> Result<(u32, Option<C>), ApiError> {
    let limit = limit.unwrap_or(50);
    if !(1..=200).contains(&limit) {
        return Err(ApiError::bad_request(
            "invalid_limit",
            "limit must be between 1 and 200",
        ));
    }
    let after = cursor
        .map(|c| {
            parse(c).ok_or_else(|| {
                ApiError::bad_request("invalid_cursor", "cursor is not one this server gave out")
            })
        })
        .transpose()?;
    Ok((limit, after))
}

pub(crate) fn cursor(created_at: OffsetDateTime, id: &str) -> String {
    format!("{}.{id}", crate::db::to_millis(created_at))
}

fn parse_cursor(raw: &str) -> Option<(i64, String)> {
    let (t, id) = raw.split_once('.')?;
    let valid_id = !id.is_empty()
        && id.len() <= 64
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    Some((t.parse().ok()?, id.to_owned())).filter(|_| valid_id)
}

/// Sandboxes, newest first, a page at a time.
#[utoipa::path(
    get,
    path = "/api/sandboxes",
    operation_id = "list_sandboxes",
    tag = "sandboxes",
    params(ListParams),
    responses(
        (status = 200, description = "A page of sandboxes", body = Page<Sandbox>),
        (status = 400, description = "`invalid_query`, `invalid_state`, `invalid_limit` or `invalid_cursor`", body = ErrorBody),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<Page<Sandbox>>, ApiError> {
    let Query(params) =
        params.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let q = list_query(params, SandboxState::ALL)?;
    let rows = state.db.list_sandboxes(&q).await?;
    let next = (rows.len() == q.limit as usize)
        .then(|| rows.last().map(|r| cursor(r.created_at, r.id.as_str())))
        .flatten();
    let items: Vec<Sandbox> = rows.into_iter().map(|r| sandbox_view(&state, r)).collect();
    Ok(Json(Page { items, next }))
}

/// Tears the sandbox down; its owner only. Its agents remove its instances and routes after
/// the answer.
#[utoipa::path(
    delete,
    path = "/api/sandboxes/{id}",
    operation_id = "delete_sandbox",
    tag = "sandboxes",
    params(("id" = String, Path, description = SANDBOX_KEY, example = "demo")),
    responses(
        (status = 202, description = "The sandbox, now `deleted`", body = Sandbox),
        (status = 403, description = "`not_owner`", body = ErrorBody),
        (status = 404, description = "`unknown_sandbox`", body = ErrorBody),
        (status = 409, description = "`sandbox_ended`: it was deleted or expired before", body = ErrorBody),
    )
)]
pub async fn delete(
    State(state): State<AppState>,
    Extension(session): Extension<CurrentSession>,
    Path(key): Path<String>,
) -> Result<Response, ApiError> {
    let sandbox = load(&state, &key).await?;
    require_owner(&sandbox, &session)?;
    require_live(&sandbox)?;
    state
        .lifecycle
        .end(&sandbox, Ending::Deleted, session.username.as_str())
        .await
        .map_err(|e| write_error(e, &sandbox.name))?;
    let row = load(&state, sandbox.id.as_str()).await?;
    Ok((StatusCode::ACCEPTED, Json(sandbox_view(&state, row))).into_response())
}

/// Makes the sandbox expire `ttl` from now; its owner only.
#[utoipa::path(
    post,
    path = "/api/sandboxes/{id}/extend",
    operation_id = "extend_sandbox",
    tag = "sandboxes",
    params(("id" = String, Path, description = SANDBOX_KEY, example = "demo")),
    request_body = Extend,
    responses(
        (status = 200, description = "The sandbox with its new expiry", body = Sandbox),
        (status = 400, description = "`invalid_ttl`, `invalid_json` or `invalid_request`", body = ErrorBody),
        (status = 403, description = "`not_owner`", body = ErrorBody),
        (status = 404, description = "`unknown_sandbox`", body = ErrorBody),
        (status = 409, description = "`sandbox_ended`", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: the body is over 1 MiB", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: the body is not sent as `application/json`", body = ErrorBody),
    )
)]
pub async fn extend(
    State(state): State<AppState>,
    Extension(session): Extension<CurrentSession>,
    Path(key): Path<String>,
    ApiJson(req): ApiJson<Extend>,
) -> Result<Json<Sandbox>, ApiError> {
    let sandbox = load(&state, &key).await?;
    require_owner(&sandbox, &session)?;
    require_live(&sandbox)?;
    let ttl = parse_ttl(&req.ttl)?;
    let expires_at = OffsetDateTime::now_utc() + ttl;
    state
        .lifecycle
        .extend(&sandbox, expires_at, session.username.as_str(), &req.ttl)
        .await
        .map_err(|e| write_error(e, &sandbox.name))?;
    let row = load(&state, sandbox.id.as_str()).await?;
    Ok(Json(sandbox_view(&state, row)))
}

/// Wakes a sleeping sandbox (its owner, as for extend): 202 at once with the sandbox as it
/// is (still `sleeping`); it is `ready` once its agent has started its instances. A sandbox
/// that does not sleep is answered the same and left as it is: waking is idempotent, and
/// the router may have woken it a moment before.
#[utoipa::path(
    post,
    path = "/api/sandboxes/{id}/wake",
    operation_id = "wake_sandbox",
    tag = "sandboxes",
    params(("id" = String, Path, description = SANDBOX_KEY, example = "demo")),
    responses(
        (status = 202, description = "The sandbox as it is; it is `ready` once its agent has started it", body = Sandbox),
        (status = 403, description = "`not_owner`", body = ErrorBody),
        (status = 404, description = "`unknown_sandbox`", body = ErrorBody),
        (status = 409, description = "`sandbox_ended`", body = ErrorBody),
    )
)]
pub async fn wake(
    State(state): State<AppState>,
    Extension(session): Extension<CurrentSession>,
    Path(key): Path<String>,
) -> Result<Response, ApiError> {
    let sandbox = load(&state, &key).await?;
    require_owner(&sandbox, &session)?;
    require_live(&sandbox)?;
    state.lifecycle.wake(&sandbox.id, session.username.as_str());
    Ok((StatusCode::ACCEPTED, Json(sandbox_view(&state, sandbox))).into_response())
}

/// Turns following of one of the sandbox's services on or off (its owner only): a followed
/// service is redeployed whenever its branch moves. Off forgets a commit that waited.
#[utoipa::path(
    patch,
    path = "/api/sandboxes/{id}/services/{service}",
    operation_id = "patch_sandbox_service",
    tag = "sandboxes",
    params(
        ("id" = String, Path, description = SANDBOX_KEY, example = "demo"),
        ("service" = String, Path, description = "A service of the sandbox", example = "orders"),
    ),
    request_body = ServicePatch,
    responses(
        (status = 200, description = "The sandbox as it is now", body = Sandbox),
        (status = 400, description = "`invalid_json` or `invalid_request`", body = ErrorBody),
        (status = 403, description = "`not_owner`", body = ErrorBody),
        (status = 404, description = "`unknown_sandbox`, or `unknown_service`: the sandbox has no such service", body = ErrorBody),
        (status = 409, description = "`sandbox_ended`", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: the body is over 1 MiB", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: the body is not sent as `application/json`", body = ErrorBody),
    )
)]
pub async fn patch_service(
    State(state): State<AppState>,
    Extension(session): Extension<CurrentSession>,
    Path((key, service)): Path<(String, String)>,
    ApiJson(req): ApiJson<ServicePatch>,
) -> Result<Json<Sandbox>, ApiError> {
    let sandbox = load(&state, &key).await?;
    require_owner(&sandbox, &session)?;
    require_live(&sandbox)?;
    let unknown = || {
        ApiError::not_found(
            "unknown_service",
            format!(
                "sandbox {} has no service {:?}",
                sandbox.name,
                service.chars().take(80).collect::<String>()
            ),
        )
    };
    if !sandbox.services.iter().any(|s| s.service == service) {
        return Err(unknown());
    }
    let detail = format!("{service} follow={}", req.follow);
    let audit = crate::db::Audit {
        actor: session.username.as_str(),
        action: if req.follow { "follow" } else { "unfollow" },
        target: sandbox.name.as_str(),
        detail: &detail,
    };
    let found = state
        .db
        .set_follow(&sandbox.id, &service, req.follow, &audit)
        .await
        .map_err(|e| write_error(e, &sandbox.name))?;
    if !found {
        return Err(unknown());
    }
    tracing::info!(sandbox = %sandbox.name, %service, follow = req.follow, user = %session.username, "following changed");
    let row = load(&state, sandbox.id.as_str()).await?;
    Ok(Json(sandbox_view(&state, row)))
}

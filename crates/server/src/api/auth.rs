//! `POST /api/login` and `POST /api/logout` (SPEC §4.1).

use std::net::SocketAddr;

use axum::Extension;
use axum::Json;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sdp_api::{ErrorBody, LoginRequest, LoginResponse, SessionInfo};
use sdp_protocol::{Credentials, JobErrorCode, Password, ProbeCredentials, Role, Username};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::{AppState, CurrentSession};
use crate::db::Audit;
use crate::dispatch::{CallError, Target, call};
use crate::error::{ApiError, ApiJson, Asked, agent_error};
use crate::limiter::{Limit, Refused, client_address};
use crate::metrics::LoginOutcome;
use crate::sessions::{self, COOKIE_NAME};

/// Checks the Bitbucket credentials with `git ls-remote` on a micro agent and opens a session.
#[utoipa::path(
    post,
    path = "/api/login",
    operation_id = "login",
    tag = "session",
    request_body = LoginRequest,
    responses(
        (status = 200, description = "Logged in: the session token, also set as the `sdp_session` cookie", body = LoginResponse,
            headers(("set-cookie" = String, description = "`sdp_session=<token>; HttpOnly; SameSite=Strict; Path=/; Max-Age=<seconds>` (and `Secure` behind https)"))),
        (status = 400, description = "`invalid_username`, `invalid_password`, `invalid_json` or `invalid_request`", body = ErrorBody),
        (status = 401, description = "`invalid_credentials`: Bitbucket did not accept this username and password", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: the body is over 1 MiB", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: the body is not sent as `application/json`", body = ErrorBody),
        (status = 429, description = "`too_many_logins`: too many attempts for this user, from this address or in all", body = ErrorBody,
            headers(("retry-after" = u64, description = "Seconds until an attempt is taken again"))),
        (status = 502, description = "`agent_error`, `repo_unreachable` or `git_failed`: the probe could not say", body = ErrorBody),
        (status = 503, description = "`no_agent` or `agent_disconnected`: no micro agent to ask", body = ErrorBody),
        (status = 504, description = "`agent_timeout` or `git_timeout`: no answer within `job_timeout`", body = ErrorBody),
    )
)]
pub async fn login(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<LoginRequest>,
) -> Result<Response, ApiError> {
    let answer = attempt(&state, peer, &headers, req).await;
    // Told by the answer, which every way out of an attempt gives.
    let outcome = match &answer {
        Ok(response) if response.status() == StatusCode::TOO_MANY_REQUESTS => {
            LoginOutcome::RateLimited
        }
        Ok(_) => LoginOutcome::Accepted,
        Err(e) if e.status == StatusCode::UNAUTHORIZED => LoginOutcome::Refused,
        Err(e) if e.status.is_client_error() => LoginOutcome::Invalid,
        Err(_) => LoginOutcome::Failed,
    };
    state.metrics.login(outcome);
    answer
}

async fn attempt(
    state: &AppState,
    peer: SocketAddr,
    headers: &HeaderMap,
    req: LoginRequest,
) -> Result<Response, ApiError> {
    let username = Username::parse(req.username)
        .map_err(|e| ApiError::bad_request("invalid_username", e.to_string()))?;
    let password = Password::parse(req.password)
        .map_err(|e| ApiError::bad_request("invalid_password", e.to_string()))?;
    // Before any job: a flood of guesses must not become a flood of git processes.
    let client = client_address(peer, headers, &state.config.trusted_proxies);
    if let Err(refused) = state.login_limiter.attempt(username.as_str(), client) {
        return Ok(too_many_logins(&username, client, refused));
    }
    let credentials = Credentials {
        username: username.clone(),
        password,
    };

    let job = ProbeCredentials {
        repo: state.config.git.probe_repo.clone(),
        credentials: credentials.clone(),
    };
    let probe = call(
        state.dispatch.as_ref(),
        Target::Any(Role::Micro),
        job,
        state.config.job_timeout.get(),
    )
    .await;
    match probe {
        Ok(_) => {}
        Err(CallError::Failed { error, .. }) if error.code == JobErrorCode::AuthFailed => {
            tracing::info!(user = %username, "login refused by the git server");
            return Err(ApiError::unauthorized(
                "invalid_credentials",
                "Bitbucket did not accept this username and password",
            ));
        }
        Err(e) => return Err(agent_error(e, Asked::Git("the probe repository"))),
    }

    let now = OffsetDateTime::now_utc();
    let ttl = state.config.session_ttl.get();
    let expires_at = now + ttl;
    let (token, token_hash) = sessions::new_token();
    let audit = Audit {
        actor: username.as_str(),
        action: "login",
        target: username.as_str(),
        detail: "",
    };
    state
        .db
        .login(&token_hash, username.as_str(), now, expires_at, &audit)
        .await?;
    // Last, so that a failure above leaves no password behind a token nobody received.
    state.vault.insert(
        token_hash,
        credentials.username,
        credentials.password,
        expires_at,
    );
    tracing::info!(user = %username, "logged in");
    // Commits of followed branches that waited for this user's credentials go out now.
    state.lifecycle.logged_in(username.as_str());

    let secure = if state.public_url.scheme() == "https" {
        "; Secure"
    } else {
        ""
    };
    let cookie = format!(
        "{COOKIE_NAME}={token}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}{secure}",
        ttl.as_secs()
    );
    let body = LoginResponse {
        token,
        user: username.to_string(),
        expires_at: expires_at.format(&Rfc3339).unwrap_or_default(),
    };
    let mut response = Json(body).into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&cookie).map_err(|e| ApiError::internal("cookie", &e))?,
    );
    Ok(response)
}

/// 429 with `Retry-After`, saying which limit and for how long.
fn too_many_logins(username: &Username, client: std::net::IpAddr, refused: Refused) -> Response {
    let secs = refused.retry_after_secs();
    let wait = if secs == 1 {
        "1 second".to_owned()
    } else {
        format!("{secs} seconds")
    };
    let (limit, message) = match refused.by {
        Limit::User => (
            "user",
            format!("too many login attempts for {username}; try again in {wait}"),
        ),
        Limit::Address => (
            "address",
            format!("too many login attempts from your address ({client}); try again in {wait}"),
        ),
        Limit::Everyone => (
            "everyone",
            format!("SDP is checking too many logins at once; try again in {wait}"),
        ),
    };
    tracing::debug!(user = %username, %client, limit, retry_after = secs, "login refused: too many attempts");
    let mut response =
        ApiError::new(StatusCode::TOO_MANY_REQUESTS, "too_many_logins", message).into_response();
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    response
}

/// Ends the session and wipes the password it held.
#[utoipa::path(
    post,
    path = "/api/logout",
    operation_id = "logout",
    tag = "session",
    responses(
        (status = 204, description = "Logged out; the cookie is cleared",
            headers(("set-cookie" = String, description = "`sdp_session=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0`"))),
    )
)]
pub async fn logout(
    State(state): State<AppState>,
    Extension(session): Extension<CurrentSession>,
) -> Result<Response, ApiError> {
    let audit = Audit {
        actor: session.username.as_str(),
        action: "logout",
        target: session.username.as_str(),
        detail: "",
    };
    state.db.logout(&session.token_hash, &audit).await?;
    state.vault.remove(&session.token_hash);
    tracing::info!(user = %session.username, "logged out");
    let clear = format!("{COOKIE_NAME}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0");
    Ok((StatusCode::NO_CONTENT, [(header::SET_COOKIE, clear)]).into_response())
}

/// Who the session belongs to, and until when: for pages and clients that hold a session but
/// not its user (a new tab); and where the sandbox router is.
#[utoipa::path(
    get,
    path = "/api/session",
    operation_id = "session",
    tag = "session",
    responses((status = 200, description = "The session's user and expiry, and the router's URL", body = SessionInfo))
)]
pub async fn session(
    State(state): State<AppState>,
    Extension(session): Extension<CurrentSession>,
) -> Json<SessionInfo> {
    Json(SessionInfo {
        gateway_url: state.config.gateway.public_url.clone(),
        user: session.username.to_string(),
        expires_at: session.expires_at.format(&Rfc3339).unwrap_or_default(),
    })
}

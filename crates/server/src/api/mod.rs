//! The HTTP API and WebSocket endpoints.
//!
//! Every endpoint is declared once in [`endpoints`], with the access it requires. The router
//! and the table that tests walk ([`route_table`]) are both built from that list, so a new
//! route cannot exist without its access rule, nor escape the tests that check it. The API
//! document (`openapi.rs`) describes each of them, and a test keeps it to that list.

mod agents;
mod auth;
mod catalog;
mod deployments;
mod hooks;
mod openapi;
mod runtime;
mod sandboxes;

use std::sync::{Arc, Weak};

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, MethodRouter, on};
use axum::{Json, Router};
use sdp_protocol::{ServiceRoutes, Username};
use subtle::ConstantTimeEq;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::config::ServerConfig;
use crate::db::Db;
use crate::dispatch::{AgentReports, Dispatch};
use crate::error::ApiError;
use crate::hub::Hub;
use crate::lifecycle::{FollowSettings, Lifecycle, RouteSource, Settings};
use crate::limiter::LoginLimiter;
use crate::logs::Logs;
use crate::metrics::{self, LogKind, Metrics, World};
use crate::runtime_logs::RuntimeLogs;
use crate::sessions::{self, PasswordVault};
use crate::ui;

pub use crate::error::MAX_BODY_BYTES;

/// Who may call an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone: login, health, and the API document (which holds no data).
    Public,
    /// Anyone: the dashboard's page (the same for every route of the app), which holds no
    /// data; it fetches everything through the API with the session.
    Page,
    /// Anyone: the dashboard's static files (`/assets/<version>/<file>`), which hold no data.
    Asset,
    /// A valid session, by cookie or `Authorization: Bearer`.
    Session,
    /// A valid session, and an `Origin` (when the client sends one) equal to `public_url`'s.
    SessionWebSocket,
    /// The agent token.
    Agent,
    /// Anyone, but only a body signed with the webhook secret (`X-Hub-Signature`) is acted
    /// on: the handler checks it (`hooks.rs`) and refuses the rest with 401.
    Webhook,
    /// Anyone: `/metrics`, which holds aggregates only. Its labels are fixed words (states,
    /// steps, roles, outcomes), never a name or an id (see `metrics.rs`); operators who
    /// want it private keep it off their public proxy.
    Metrics,
}

/// One row of the server's own route list.
#[derive(Debug, Clone)]
pub struct RouteSpec {
    pub method: Method,
    pub path: &'static str,
    pub access: Access,
}

struct Endpoint {
    spec: RouteSpec,
    handler: MethodRouter<AppState>,
}

fn endpoint<H, T>(method: Method, path: &'static str, access: Access, handler: H) -> Endpoint
where
    H: axum::handler::Handler<T, AppState>,
    T: 'static,
{
    let filter = MethodFilter::try_from(method.clone()).expect("a standard method");
    Endpoint {
        spec: RouteSpec {
            method,
            path,
            access,
        },
        handler: on(filter, handler),
    }
}

fn endpoints() -> Vec<Endpoint> {
    use Access::*;
    vec![
        endpoint(Method::GET, "/", Page, ui::home),
        endpoint(Method::GET, "/login", Page, ui::login),
        endpoint(Method::GET, "/sandboxes", Page, ui::sandboxes),
        endpoint(Method::GET, "/new", Page, ui::new_sandbox),
        endpoint(Method::GET, "/sandboxes/{name}", Page, ui::sandbox),
        endpoint(Method::GET, "/deployments/{id}", Page, ui::deployment),
        endpoint(Method::GET, "/agents", Page, ui::agents),
        endpoint(Method::GET, "/hooks", Page, ui::hooks),
        endpoint(Method::GET, "/assets/{version}/{file}", Asset, ui::asset),
        endpoint(Method::GET, "/api/health", Public, health),
        endpoint(Method::GET, "/api/openapi.json", Session, openapi::document),
        endpoint(Method::GET, "/metrics", Metrics, scrape_metrics),
        endpoint(Method::POST, "/api/login", Public, auth::login),
        endpoint(Method::POST, "/api/logout", Session, auth::logout),
        endpoint(Method::GET, "/api/session", Session, auth::session),
        endpoint(Method::GET, "/api/services", Session, catalog::services),
        endpoint(
            Method::GET,
            "/api/services/{name}/branches",
            Session,
            catalog::branches,
        ),
        endpoint(Method::GET, "/api/agents", Session, agents::list),
        endpoint(
            Method::POST,
            "/api/hooks/bitbucket",
            Webhook,
            hooks::bitbucket,
        ),
        endpoint(
            Method::GET,
            "/api/hooks/deliveries",
            Session,
            hooks::deliveries,
        ),
        endpoint(Method::POST, "/api/sandboxes", Session, sandboxes::create),
        endpoint(Method::GET, "/api/sandboxes", Session, sandboxes::list),
        endpoint(Method::GET, "/api/sandboxes/{id}", Session, sandboxes::get),
        endpoint(
            Method::DELETE,
            "/api/sandboxes/{id}",
            Session,
            sandboxes::delete,
        ),
        endpoint(
            Method::POST,
            "/api/sandboxes/{id}/deploy",
            Session,
            sandboxes::redeploy,
        ),
        endpoint(
            Method::POST,
            "/api/sandboxes/{id}/extend",
            Session,
            sandboxes::extend,
        ),
        endpoint(
            Method::POST,
            "/api/sandboxes/{id}/wake",
            Session,
            sandboxes::wake,
        ),
        endpoint(
            Method::PATCH,
            "/api/sandboxes/{id}/services/{service}",
            Session,
            sandboxes::patch_service,
        ),
        endpoint(
            Method::GET,
            "/api/sandboxes/{id}/requests",
            Session,
            sandboxes::requests,
        ),
        endpoint(
            Method::GET,
            "/api/sandboxes/{id}/logs",
            Session,
            runtime::logs,
        ),
        endpoint(
            Method::GET,
            "/api/sandboxes/{id}/history",
            Session,
            runtime::history,
        ),
        endpoint(
            Method::GET,
            "/api/sandboxes/{id}/deployments",
            Session,
            deployments::of_sandbox,
        ),
        endpoint(Method::GET, "/api/deployments", Session, deployments::list),
        endpoint(
            Method::GET,
            "/api/deployments/{id}",
            Session,
            deployments::get,
        ),
        endpoint(
            Method::GET,
            "/api/deployments/{id}/logs",
            Session,
            deployments::logs,
        ),
        endpoint(Method::GET, "/ws/agent", Agent, agents::socket),
        endpoint(
            Method::GET,
            "/ws/deployments/{id}",
            SessionWebSocket,
            deployments::socket,
        ),
        endpoint(
            Method::GET,
            "/ws/sandboxes/{id}/logs",
            SessionWebSocket,
            runtime::socket,
        ),
    ]
}

/// The server's routes with their access rules, as the router serves them.
pub fn route_table() -> Vec<RouteSpec> {
    endpoints().into_iter().map(|e| e.spec).collect()
}

pub(crate) struct Inner {
    pub config: ServerConfig,
    pub public_url: url::Url,
    pub db: Db,
    /// The agents' connections: their WebSocket, and who is connected.
    pub hub: Arc<Hub>,
    /// Jobs for agents, wherever they are connected.
    pub dispatch: Arc<dyn Dispatch>,
    pub lifecycle: Arc<Lifecycle>,
    pub vault: Arc<PasswordVault>,
    pub login_limiter: LoginLimiter,
    /// Refused webhook deliveries recorded this minute.
    pub hook_refusals: hooks::Refusals,
    pub metrics: Arc<Metrics>,
    pub shutdown: CancellationToken,
    /// The agent connections, waited for at shutdown.
    pub connections: tokio_util::task::TaskTracker,
    /// `sdp dev`: the login page says that any password is accepted.
    pub dev_mode: bool,
    agent_token_digest: [u8; 32],
}

#[derive(Clone)]
pub(crate) struct AppState(Arc<Inner>);

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl AppState {
    pub fn new(
        config: ServerConfig,
        public_url: url::Url,
        db: Db,
        shutdown: CancellationToken,
        dev_mode: bool,
    ) -> std::io::Result<Self> {
        let agent_token_digest = digest(config.agent_token.expose());
        let catalog = config
            .services
            .iter()
            .map(|s| ServiceRoutes {
                service: s.name.clone(),
                routes: s.routes.clone(),
                baseline: s.baseline.clone(),
            })
            .collect();
        let metrics = Arc::new(Metrics::default());
        let logs = Logs::new(
            config.data_dir.join("logs"),
            config.max_log_size,
            metrics.stored_lines(LogKind::Deployment),
        )?;
        let runtime_logs = RuntimeLogs::new(
            config.data_dir.join("runtime"),
            config.max_runtime_log_size,
            metrics.stored_lines(LogKind::Runtime),
        )?;
        let gateway_services: std::collections::HashSet<sdp_protocol::ServiceName> = config
            .services
            .iter()
            .filter(|s| s.kind == crate::config::ServiceKind::Gateway)
            .map(|s| s.name.clone())
            .collect();
        let settings = Settings {
            job_timeout: config.job_timeout.get(),
            agent_timeout: config.agent_timeout.get(),
            gateway_url: config.gateway.public_url.clone(),
            idle_after: Some(config.idle_after.get()).filter(|d| !d.is_zero()),
            wake_timeout: config.wake_timeout.get(),
            gateway_services: gateway_services.clone(),
            follow: FollowSettings {
                catalog: config.services.clone(),
                debounce: config.webhooks.debounce.get(),
                poll_interval: Some(config.webhooks.poll_interval.get()).filter(|d| !d.is_zero()),
            },
        };
        let vault = Arc::new(PasswordVault::default());
        let source = |dispatch| RouteSource {
            db: db.clone(),
            dispatch,
            base_domain: config.gateway.base_domain.clone(),
            catalog,
            gateway_services,
            timeout: config.job_timeout.get(),
            wake_timeout: config.wake_timeout.get(),
        };
        // The hub reports to the lifecycle, which dispatches through the hub: the hub holds
        // the lifecycle weakly, so that neither keeps the other alive.
        let mut built_hub = None;
        let lifecycle = Arc::new_cyclic(|me: &Weak<Lifecycle>| {
            let reports: Weak<dyn AgentReports> = me.clone();
            let hub = Arc::new(Hub::new(
                reports,
                config.agent_timeout.get(),
                shutdown.clone(),
            ));
            built_hub = Some(hub.clone());
            Lifecycle::new(
                me.clone(),
                db.clone(),
                logs,
                runtime_logs,
                hub,
                source,
                settings,
                metrics.clone(),
                vault.clone(),
                shutdown.clone(),
            )
        });
        let hub = built_hub.expect("built with the lifecycle");
        Ok(Self(Arc::new(Inner {
            config,
            public_url,
            db,
            dispatch: hub.clone(),
            hub,
            lifecycle,
            vault,
            login_limiter: LoginLimiter::default(),
            hook_refusals: hooks::Refusals::default(),
            metrics,
            shutdown,
            connections: tokio_util::task::TaskTracker::new(),
            dev_mode,
            agent_token_digest,
        })))
    }
}

fn digest(s: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(s.as_bytes()).into()
}

pub(crate) fn router(state: AppState) -> Router {
    let mut router = Router::new();
    for Endpoint { spec, handler } in endpoints() {
        let handler = match spec.access {
            Access::Public | Access::Page | Access::Asset | Access::Metrics | Access::Webhook => {
                handler
            }
            Access::Session => handler.route_layer(middleware::from_fn_with_state(
                state.clone(),
                require_session,
            )),
            Access::SessionWebSocket => handler.route_layer(middleware::from_fn_with_state(
                state.clone(),
                require_session_and_origin,
            )),
            Access::Agent => handler.route_layer(middleware::from_fn_with_state(
                state.clone(),
                require_agent_token,
            )),
        };
        router = router.route(spec.path, handler);
    }
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::not_found("not_found", "there is no such endpoint")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not take that method",
    )
}

/// Whether the control plane answers, and how many agents are connected.
#[utoipa::path(
    get,
    path = "/api/health",
    operation_id = "health",
    tag = "session",
    responses((status = 200, description = "The control plane answers", body = sdp_api::Health))
)]
async fn health(State(state): State<AppState>) -> Json<sdp_api::Health> {
    Json(sdp_api::Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        agents: state.dispatch.connected().await.len(),
        mode: if state.dev_mode { "dev" } else { "server" }.into(),
    })
}

/// `GET /metrics`: the counters as they are, and the world (agents, sandboxes) as it is now.
#[utoipa::path(
    get,
    path = "/metrics",
    operation_id = "metrics",
    tag = "operations",
    responses(
        (status = 200, description = "The control plane's metrics in Prometheus text format (0.0.4). No label holds a user, sandbox, branch, service or agent name", content_type = "text/plain", body = String),
        (status = 500, description = "`internal`: the database could not be read", body = sdp_api::ErrorBody)
    )
)]
async fn scrape_metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let read = async {
        let agents = state
            .dispatch
            .connected()
            .await
            .into_iter()
            .map(|a| a.role)
            .collect();
        let sandboxes = state.db.live_sandbox_counts().await?;
        Ok::<_, ApiError>(World { agents, sandboxes })
    };
    let text = state.metrics.encode(read).await?;
    Ok(([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response())
}

/// The caller of a session endpoint, put in the request's extensions by the middleware.
#[derive(Debug, Clone)]
pub(crate) struct CurrentSession {
    pub token_hash: String,
    pub username: Username,
    pub expires_at: OffsetDateTime,
}

/// The session token a request carries, and whether it came as the cookie:
/// `Authorization: Bearer` first, then the cookie.
fn presented_token(headers: &HeaderMap) -> Option<(&str, bool)> {
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        let token = value
            .to_str()
            .ok()?
            .strip_prefix("Bearer ")
            .map(str::trim)?;
        return Some((token, false));
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == sessions::COOKIE_NAME)
        .map(|(_, value)| (value, true))
}

/// The request's session, and whether it came as the cookie.
async fn authenticate(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<(CurrentSession, bool), ApiError> {
    let (token, by_cookie) = presented_token(headers).ok_or_else(|| {
        ApiError::unauthorized(
            "unauthenticated",
            "log in first: send the session token as a cookie or `Authorization: Bearer`",
        )
    })?;
    let invalid = || {
        ApiError::unauthorized(
            "unauthenticated",
            "the session token is not valid; log in again",
        )
    };
    if !sessions::looks_like_token(token) {
        return Err(invalid());
    }
    let token_hash = sessions::hash_token(token);
    let row = state.db.session(&token_hash).await?.ok_or_else(invalid)?;
    if row.expires_at <= OffsetDateTime::now_utc() {
        // The row stays until the sweeper's grace ends, so its holder keeps hearing "expired".
        state.vault.remove(&token_hash);
        return Err(ApiError::unauthorized(
            "session_expired",
            "your session has expired; log in again",
        ));
    }
    let username =
        Username::parse(row.username).map_err(|e| ApiError::internal("session user", &e))?;
    let session = CurrentSession {
        token_hash,
        username,
        expires_at: row.expires_at,
    };
    Ok((session, by_cookie))
}

/// Whether the request's `Origin` is `public_url`'s.
fn origin_matches(state: &AppState, headers: &HeaderMap) -> Option<bool> {
    let origin = headers.get(header::ORIGIN)?;
    Some(
        origin
            .to_str()
            .ok()
            .and_then(|o| url::Url::parse(o).ok())
            .is_some_and(|o| o.origin() == state.public_url.origin()),
    )
}

async fn require_session(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let (session, by_cookie) = authenticate(&state, req.headers()).await?;
    // A browser sends the cookie with whatever request any page makes, and SameSite is a
    // policy of the browser's, not ours: a change made with the cookie must come from our
    // own pages, which browsers say in `Origin` on every request that is not a GET or HEAD.
    // Clients that send the token themselves (the CLI, `Authorization: Bearer`) are not
    // browsers riding on a cookie, and are let through.
    if by_cookie && !req.method().is_safe() && origin_matches(&state, req.headers()) != Some(true) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden_origin",
            format!(
                "a change made with the session cookie must come from a page of {} (its Origin header is missing or another)",
                state.public_url.origin().ascii_serialization()
            ),
        ));
    }
    req.extensions_mut().insert(session);
    Ok(next.run(req).await)
}

async fn require_session_and_origin(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    // Browsers always send Origin on a WebSocket upgrade, and a page of another site must not
    // ride on the user's cookie. Clients that are not browsers (the CLI) send none.
    if origin_matches(&state, req.headers()) == Some(false) {
        let allowed = state.public_url.origin().ascii_serialization();
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden_origin",
            format!("WebSocket connections are accepted only from pages of {allowed}"),
        ));
    }
    require_session(State(state), req, next).await
}

async fn require_agent_token(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Comparing digests keeps the comparison constant-time whatever the lengths.
    let ok =
        presented.is_some_and(|token| bool::from(digest(token).ct_eq(&state.agent_token_digest)));
    if !ok {
        tracing::warn!(peer = ?req.headers().get("x-forwarded-for"), "agent refused: wrong or missing agent token");
        return Err(ApiError::unauthorized(
            "invalid_agent_token",
            "the agent token is missing or wrong",
        ));
    }
    Ok(next.run(req).await)
}

/// Times in the API are RFC 3339.
pub(crate) fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// A response with our error shape for a refused WebSocket upgrade.
pub(crate) fn websocket_required() -> Response {
    ApiError::bad_request(
        "websocket_required",
        "this endpoint is a WebSocket; connect with an upgrade request",
    )
    .into_response()
}

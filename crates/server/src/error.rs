//! Every error the API returns has the shape of SPEC §11:
//! `{"error": {"code": "...", "message": "..."}}`, with a stable `code` for programs and a
//! `message` for people.

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use sdp_protocol::{JobErrorCode, Role};
use serde::de::DeserializeOwned;

use crate::dispatch::CallError;

/// The largest request body accepted.
pub const MAX_BODY_BYTES: usize = 1 << 20;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    pub fn unauthorized(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, code, message)
    }

    /// A failure of ours. The cause is logged here, once, with its whole chain; the client
    /// gets a generic message.
    pub fn internal(context: &str, err: &(dyn std::error::Error + 'static)) -> Self {
        let mut chain = err.to_string();
        let mut source = err.source();
        while let Some(s) = source {
            chain.push_str(": ");
            chain.push_str(&s.to_string());
            source = s.source();
        }
        tracing::error!(context, error = %chain, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the server failed to handle this request; its log says why",
        )
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        ApiError::internal("database", &e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = sdp_api::ErrorBody {
            error: sdp_api::ErrorDetail {
                code: self.code.to_owned(),
                message: self.message,
            },
        };
        (self.status, Json(body)).into_response()
    }
}

/// `Json<T>` whose rejections are in our error shape instead of axum's plain text.
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(ApiJson(value)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    let status = rejection.status();
    match rejection {
        JsonRejection::MissingJsonContentType(_) => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as JSON with `Content-Type: application/json`",
        ),
        JsonRejection::JsonSyntaxError(e) => ApiError::bad_request(
            "invalid_json",
            format!("the body is not valid JSON: {}", e.body_text()),
        ),
        JsonRejection::JsonDataError(e) => ApiError::bad_request(
            "invalid_request",
            format!("the body does not fit this request: {}", e.body_text()),
        ),
        other if status == StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
            status,
            "payload_too_large",
            format!(
                "the body is larger than the limit of {} bytes",
                MAX_BODY_BYTES
            ),
        )
        .with_log(&other),
        other => ApiError::new(status, "invalid_request", other.body_text()),
    }
}

impl ApiError {
    fn with_log(self, cause: &dyn std::fmt::Display) -> Self {
        tracing::debug!(code = self.code, cause = %cause, "request refused");
        self
    }
}

/// What a job sent to an agent was about, for the API's error.
pub enum Asked<'a> {
    /// git, on the repository named so (for the message).
    Git(&'a str),
    /// The router of a gateway agent.
    Router,
}

/// Every failure of a call to an agent, as the API says it.
pub fn agent_error(e: CallError, asked: Asked<'_>) -> ApiError {
    let what = match asked {
        Asked::Git(what) => what,
        Asked::Router => {
            if let CallError::Failed { agent, error } = e {
                return ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "agent_error",
                    format!("gateway agent {agent} could not say: {}", error.message),
                );
            }
            "the router"
        }
    };
    match e {
        CallError::NoAgent(role) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_agent",
            match role {
                Role::Micro => "no micro agent is connected, so SDP cannot reach git right now; start `sdp agent --role micro` or try again shortly".to_owned(),
                Role::Gateway => "no gateway agent is connected, so there are no routing decisions to show; start `sdp agent --role gateway`".to_owned(),
            },
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
        CallError::BadReply { .. } | CallError::WrongReply { .. } => {
            ApiError::new(StatusCode::BAD_GATEWAY, "agent_error", e.to_string())
        }
        CallError::JobTooLarge { .. } => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "job_too_large",
            e.to_string(),
        ),
        CallError::Failed { error, .. } => match error.code {
            JobErrorCode::AuthFailed => ApiError::new(
                StatusCode::FORBIDDEN,
                "repo_access_denied",
                format!("Bitbucket refused your credentials for {what}"),
            ),
            JobErrorCode::RepoUnreachable => ApiError::new(
                StatusCode::BAD_GATEWAY,
                "repo_unreachable",
                format!("{what} cannot be reached: {}", error.message),
            ),
            JobErrorCode::Timeout => ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "git_timeout",
                format!("git did not answer in time for {what}"),
            ),
            JobErrorCode::Failed | JobErrorCode::Unsupported => ApiError::new(
                StatusCode::BAD_GATEWAY,
                "git_failed",
                format!("git failed for {what}: {}", error.message),
            ),
        },
    }
}

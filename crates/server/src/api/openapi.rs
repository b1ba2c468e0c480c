//! `GET /api/openapi.json`: the API's OpenAPI document, generated from the code. Each
//! handler describes itself (`#[utoipa::path]`: parameters, body, every answer), the types of
//! `sdp-api` give the schemas, and what a route's [`Access`] adds (the security it requires,
//! the refusals of its middleware) is written here from [`route_table`], the very list the
//! router applies, so that it is said once. A test keeps the document's operations equal to
//! the route table.

use std::sync::LazyLock;

use axum::http::{Method, header};
use axum::response::{IntoResponse, Response};
use utoipa::openapi::path::{Operation, PathItem};
use utoipa::openapi::security::{
    ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
use utoipa::{Modify, OpenApi};

use super::{Access, agents, auth, catalog, deployments, hooks, route_table, runtime, sandboxes};
use crate::sessions::COOKIE_NAME;
use crate::ui;

/// The names of the security schemes in the document.
const SESSION_COOKIE: &str = "session_cookie";
const SESSION_BEARER: &str = "session_bearer";
const AGENT_TOKEN: &str = "agent_token";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "SDP",
        description = "The JSON API of SDP, the Sandbox Deployment Platform. Errors are the HTTP status and `{\"error\": {\"code\", \"message\"}}` (the `ErrorBody` schema); times are RFC 3339; a path's sandbox is its id or its name."
    ),
    paths(
        ui::home,
        ui::login,
        ui::sandboxes,
        ui::new_sandbox,
        ui::sandbox,
        ui::deployment,
        ui::agents,
        ui::hooks,
        ui::asset,
        super::health,
        super::scrape_metrics,
        document,
        auth::login,
        auth::logout,
        auth::session,
        catalog::services,
        catalog::branches,
        agents::list,
        hooks::bitbucket,
        hooks::deliveries,
        sandboxes::create,
        sandboxes::list,
        sandboxes::get,
        sandboxes::delete,
        sandboxes::redeploy,
        sandboxes::extend,
        sandboxes::wake,
        sandboxes::requests,
        sandboxes::patch_service,
        runtime::logs,
        runtime::history,
        deployments::list,
        deployments::of_sandbox,
        deployments::get,
        deployments::logs,
        agents::socket,
        deployments::socket,
        runtime::socket,
    ),
    // The frames of the log WebSockets, which no HTTP body refers to.
    components(schemas(sdp_api::Frame)),
    modifiers(&ByAccess),
    tags(
        (name = "dashboard", description = "The web app: its page, for each of its routes, and its static files"),
        (name = "session", description = "Health, login and the session"),
        (name = "catalog", description = "Services and their branches"),
        (name = "agents", description = "The agents"),
        (name = "sandboxes", description = "Sandboxes: deploy, read, extend, wake, delete; their runtime logs"),
        (name = "deployments", description = "Deployments and their logs"),
        (name = "hooks", description = "Push webhooks that redeploy followed branches, and their delivery log"),
        (name = "operations", description = "Metrics for operators"),
    )
)]
struct ApiDoc;

/// The document, serialized once on first use: it never changes while the server runs.
static DOCUMENT: LazyLock<String> = LazyLock::new(|| {
    ApiDoc::openapi()
        .to_json()
        .expect("the OpenAPI document serializes")
});

/// This document.
#[utoipa::path(
    get,
    path = "/api/openapi.json",
    operation_id = "openapi",
    tag = "session",
    responses((status = 200, description = "The OpenAPI 3.1 document of this API", content_type = "application/json", body = Object))
)]
pub async fn document() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        DOCUMENT.as_str(),
    )
        .into_response()
}

/// Adds the security schemes, and to each operation the security and middleware refusals of
/// its route's access.
struct ByAccess;

impl Modify for ByAccess {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            SESSION_COOKIE,
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::with_description(
                COOKIE_NAME,
                "The session token, as `POST /api/login` sets it",
            ))),
        );
        components.add_security_scheme(
            SESSION_BEARER,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("The session token `POST /api/login` answers"))
                    .build(),
            ),
        );
        components.add_security_scheme(
            AGENT_TOKEN,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "The agent token (`agent_token`), which only agents hold",
                    ))
                    .build(),
            ),
        );
        for route in route_table() {
            // A route without an operation is what the route table test reports.
            let Some(operation) = doc
                .paths
                .paths
                .get_mut(route.path)
                .and_then(|item| operation_mut(item, &route.method))
            else {
                continue;
            };
            match route.access {
                Access::Public
                | Access::Page
                | Access::Asset
                | Access::Metrics
                | Access::Webhook => {}
                Access::Session => {
                    require_session(operation);
                    if !route.method.is_safe() {
                        refusal(
                            operation,
                            "403",
                            "`forbidden_origin`: the session came as the cookie, and the request's `Origin` is missing or not `public_url`'s",
                        );
                    }
                }
                Access::SessionWebSocket => {
                    require_session(operation);
                    refusal(
                        operation,
                        "403",
                        "`forbidden_origin`: the request's `Origin` is not `public_url`'s",
                    );
                }
                Access::Agent => {
                    operation.security = Some(vec![SecurityRequirement::new(
                        AGENT_TOKEN,
                        Vec::<String>::new(),
                    )]);
                    refusal(
                        operation,
                        "401",
                        "`invalid_agent_token`: the agent token is missing or wrong",
                    );
                }
            }
        }
    }
}

fn require_session(operation: &mut Operation) {
    operation.security = Some(vec![
        SecurityRequirement::new(SESSION_COOKIE, Vec::<String>::new()),
        SecurityRequirement::new(SESSION_BEARER, Vec::<String>::new()),
    ]);
    refusal(
        operation,
        "401",
        "`unauthenticated` (no session token, or not a valid one) or `session_expired`",
    );
}

/// Adds an `ErrorBody` answer with `status`, or, when the handler has its own answer with
/// that status, adds the middleware's reason to it.
fn refusal(operation: &mut Operation, status: &str, description: &str) {
    let responses = &mut operation.responses.responses;
    if let Some(RefOr::T(existing)) = responses.get_mut(status) {
        existing.description = format!("{description}; or {}", existing.description);
        return;
    }
    let body = ContentBuilder::new()
        .schema(Some(Ref::from_schema_name("ErrorBody")))
        .build();
    let response = ResponseBuilder::new()
        .description(description)
        .content("application/json", body)
        .build();
    responses.insert(status.to_owned(), RefOr::T(response));
}

fn operation_mut<'a>(item: &'a mut PathItem, method: &Method) -> Option<&'a mut Operation> {
    let slot = match *method {
        Method::GET => &mut item.get,
        Method::POST => &mut item.post,
        Method::PUT => &mut item.put,
        Method::DELETE => &mut item.delete,
        Method::PATCH => &mut item.patch,
        Method::HEAD => &mut item.head,
        Method::OPTIONS => &mut item.options,
        Method::TRACE => &mut item.trace,
        _ => return None,
    };
    slot.as_mut()
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashSet};

    use serde_json::Value;

    use super::*;

    fn document() -> Value {
        serde_json::from_str(&DOCUMENT).expect("the document is JSON")
    }

    /// Every operation of the document: `(METHOD, path, operation)`.
    fn operations(doc: &Value) -> Vec<(String, String, Value)> {
        let mut out = Vec::new();
        const METHODS: [&str; 9] = [
            "get", "put", "post", "delete", "options", "head", "patch", "trace", "query",
        ];
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for (key, operation) in item.as_object().expect("a path item") {
                if METHODS.contains(&key.as_str()) {
                    out.push((key.to_ascii_uppercase(), path.clone(), operation.clone()));
                }
            }
            // OpenAPI 3.2's other methods.
            if let Some(more) = item["additionalOperations"].as_object() {
                for (method, operation) in more {
                    out.push((method.clone(), path.clone(), operation.clone()));
                }
            }
        }
        out
    }

    #[test]
    fn the_document_describes_exactly_the_routes_the_server_serves() {
        let doc = document();
        let documented: BTreeSet<(String, String)> = operations(&doc)
            .into_iter()
            .map(|(method, path, _)| (method, path))
            .collect();
        let served: BTreeSet<(String, String)> = route_table()
            .into_iter()
            .map(|r| (r.method.to_string(), r.path.to_owned()))
            .collect();
        let undocumented: Vec<String> = served
            .difference(&documented)
            .map(|(m, p)| format!("{m} {p}"))
            .collect();
        let not_served: Vec<String> = documented
            .difference(&served)
            .map(|(m, p)| format!("{m} {p}"))
            .collect();
        assert!(
            undocumented.is_empty(),
            "routes of endpoints() missing from GET /api/openapi.json (give the handler a \
             #[utoipa::path] and list it in ApiDoc's paths): {undocumented:?}"
        );
        assert!(
            not_served.is_empty(),
            "operations of GET /api/openapi.json that endpoints() does not serve: {not_served:?}"
        );
    }

    #[test]
    fn each_operation_requires_what_its_route_requires() {
        let doc = document();
        let ops = operations(&doc);
        for route in route_table() {
            let (_, _, operation) = ops
                .iter()
                .find(|(m, p, _)| *m == route.method.as_str() && p == route.path)
                .expect("documented");
            let schemes: Vec<&str> = operation["security"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|req| req.as_object().expect("a requirement").keys())
                .map(String::as_str)
                .collect();
            let expected: &[&str] = match route.access {
                Access::Public
                | Access::Page
                | Access::Asset
                | Access::Metrics
                | Access::Webhook => &[],
                Access::Session | Access::SessionWebSocket => &[SESSION_COOKIE, SESSION_BEARER],
                Access::Agent => &[AGENT_TOKEN],
            };
            assert_eq!(schemes, expected, "{} {}", route.method, route.path);
            assert!(
                expected.is_empty() || operation["responses"]["401"].is_object(),
                "{} {} does not say that it refuses a caller without credentials",
                route.method,
                route.path
            );
        }
        let cookie = &doc["components"]["securitySchemes"][SESSION_COOKIE];
        assert_eq!(cookie["in"], "cookie");
        assert_eq!(cookie["name"], COOKIE_NAME);
    }

    #[test]
    fn every_refusal_has_the_error_shape_and_operation_ids_are_unique() {
        let doc = document();
        let mut ids = HashSet::new();
        for (method, path, operation) in operations(&doc) {
            let id = operation["operationId"].as_str().expect("an operationId");
            assert!(ids.insert(id.to_owned()), "{id} is used twice");
            for (status, response) in operation["responses"].as_object().expect("responses") {
                if status.as_str() < "400" {
                    continue;
                }
                assert_eq!(
                    response["content"]["application/json"]["schema"]["$ref"],
                    "#/components/schemas/ErrorBody",
                    "{method} {path} {status}"
                );
            }
        }
    }
}

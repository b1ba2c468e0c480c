//! The dashboard: the static files of `crates/server/ui/` (a page, a stylesheet and native ES
//! modules, no build step), embedded in the binary at build time.
//!
//! The files are served under `/assets/<version>/<file>`, where the version is a digest of
//! all of them: a browser may keep them for a year without asking again, since a changed file
//! is a new version and so a new URL. Modules import each other by relative names, so the
//! version is written only into the page, which is the one thing a browser asks again for
//! every time (with its `ETag`, answered `304 Not Modified` while it holds). Every route of
//! the app (`/sandboxes/demo`, `/deployments/…`) answers the same page, whose router draws
//! what the path names, so a link to any page can be shared and opened directly.

use std::collections::HashMap;
use std::sync::LazyLock;

use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use crate::error::ApiError;

/// `(file name, content type, contents)`: the files of `crates/server/ui/`.
macro_rules! embed {
    ($($name:literal => $type:expr),* $(,)?) => {
        &[$(($name, $type, include_bytes!(concat!("../ui/", $name)).as_slice())),*]
    };
}

const JS: &str = "text/javascript; charset=utf-8";

/// Every file the page may load. A module missing here is a 404 in the browser, which the
/// browser tests see at once.
const FILES: &[(&str, &str, &[u8])] = embed![
    "app.css" => "text/css; charset=utf-8",
    "main.js" => JS,
    "router.js" => JS,
    "api.js" => JS,
    "session.js" => JS,
    "dom.js" => JS,
    "ansi.js" => JS,
    "logview.js" => JS,
    "follow.js" => JS,
    "picker.js" => JS,
    "logtools.js" => JS,
    "page-login.js" => JS,
    "page-sandboxes.js" => JS,
    "page-new.js" => JS,
    "page-sandbox.js" => JS,
    "page-deployment.js" => JS,
    "page-agents.js" => JS,
    "page-hooks.js" => JS,
];

const INDEX: &str = include_str!("../ui/index.html");

/// What the page may load and do: its own files and API only. A log line or a branch name
/// that somehow became markup could still run nothing.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'self'; \
     frame-ancestors 'none'";

/// A year: the longest lifetime caches honour.
const IMMUTABLE: &str = "public, max-age=31536000, immutable";

struct Asset {
    content_type: &'static str,
    body: &'static [u8],
    etag: HeaderValue,
}

struct Bundle {
    version: String,
    index: String,
    index_etag: HeaderValue,
    assets: HashMap<&'static str, Asset>,
}

fn etag_of(bytes: &[u8]) -> HeaderValue {
    let digest = hex::encode(&Sha256::digest(bytes)[..12]);
    HeaderValue::from_str(&format!("\"{digest}\"")).expect("hex is a valid header value")
}

/// Built once, at the first request: the files never change while the server runs.
static BUNDLE: LazyLock<Bundle> = LazyLock::new(|| {
    let mut all = Sha256::new();
    for (name, _, body) in FILES {
        all.update(name.as_bytes());
        all.update((body.len() as u64).to_le_bytes());
        all.update(body);
    }
    let version = hex::encode(&all.finalize()[..8]);
    let index = INDEX.replace("{{version}}", &version);
    let assets = FILES
        .iter()
        .map(|(name, content_type, body)| {
            let asset = Asset {
                content_type,
                body,
                etag: etag_of(body),
            };
            (*name, asset)
        })
        .collect();
    Bundle {
        index_etag: etag_of(index.as_bytes()),
        version,
        index,
        assets,
    }
});

/// Whether `If-None-Match` names `etag` (or `*`): the client's copy is current.
fn fresh(headers: &HeaderMap, etag: &HeaderValue) -> bool {
    let Some(tags) = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let etag = etag.to_str().unwrap_or_default();
    tags.split(',')
        .map(|t| t.trim().trim_start_matches("W/"))
        .any(|t| t == etag || t == "*")
}

fn not_modified(etag: &HeaderValue, cache: &'static str) -> Response {
    (
        StatusCode::NOT_MODIFIED,
        [
            (header::ETAG, etag.clone()),
            (header::CACHE_CONTROL, HeaderValue::from_static(cache)),
        ],
    )
        .into_response()
}

/// The app's page, for every route of the app.
fn page(headers: &HeaderMap) -> Response {
    let bundle = &*BUNDLE;
    // Asked again every time (`no-cache`), so that a new version of the server is picked up
    // at the next page load; the ETag makes that a 304 while nothing changed.
    if fresh(headers, &bundle.index_etag) {
        return not_modified(&bundle.index_etag, "no-cache");
    }
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            ),
            (header::ETAG, bundle.index_etag.clone()),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CONTENT_SECURITY_POLICY),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (
                header::REFERRER_POLICY,
                HeaderValue::from_static("same-origin"),
            ),
        ],
        bundle.index.clone(),
    )
        .into_response()
}

/// A file of the dashboard, by the version the page names.
#[utoipa::path(
    get,
    path = "/assets/{version}/{file}",
    operation_id = "dashboard_asset",
    tag = "dashboard",
    params(
        ("version" = String, Path, description = "The dashboard's version, as its page names it"),
        ("file" = String, Path, description = "A file of the dashboard (`main.js`, `app.css`, …)"),
    ),
    responses(
        (status = 200, description = "The file, cacheable for a year: another version is another URL", content_type = "text/javascript", body = String,
            headers(("etag" = String, description = "The file's digest"),
                    ("cache-control" = String, description = "`public, max-age=31536000, immutable`"))),
        (status = 304, description = "Not modified: `If-None-Match` names the file's ETag"),
        (status = 404, description = "`not_found`: no such file in this version of the dashboard", body = sdp_api::ErrorBody),
    )
)]
pub async fn asset(
    Path((version, file)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let bundle = &*BUNDLE;
    let asset = (version == bundle.version)
        .then(|| bundle.assets.get(file.as_str()))
        .flatten()
        .ok_or_else(|| {
            ApiError::not_found(
                "not_found",
                "there is no such file in this version of the dashboard; reload the page",
            )
        })?;
    if fresh(&headers, &asset.etag) {
        return Ok(not_modified(&asset.etag, IMMUTABLE));
    }
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static(asset.content_type),
            ),
            (header::ETAG, asset.etag.clone()),
            (header::CACHE_CONTROL, HeaderValue::from_static(IMMUTABLE)),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
        ],
        asset.body,
    )
        .into_response())
}

/// One route of the app: a handler with its own entry in the API document.
macro_rules! app_route {
    ($(#[doc = $doc:literal])* $name:ident, $path:literal, $id:literal $(, ($param:literal, $what:literal))?) => {
        $(#[doc = $doc])*
        #[utoipa::path(
            get,
            path = $path,
            operation_id = $id,
            tag = "dashboard",
            $(params(($param = String, Path, description = $what)),)?
            responses(
                (status = 200, description = "The dashboard's page (it holds no data: it calls the API with the session)", content_type = "text/html", body = String,
                    headers(("etag" = String, description = "The page's digest"))),
                (status = 304, description = "Not modified: `If-None-Match` names the page's ETag"),
            )
        )]
        pub async fn $name(headers: HeaderMap) -> Response {
            page(&headers)
        }
    };
}

app_route!(
    /// The dashboard: the user's sandboxes, or the sign-in form.
    home, "/", "dashboard"
);
app_route!(
    /// The sign-in form.
    login, "/login", "dashboard_login"
);
app_route!(
    /// The list of sandboxes.
    sandboxes, "/sandboxes", "dashboard_sandboxes"
);
app_route!(
    /// The form that creates a sandbox.
    new_sandbox, "/new", "dashboard_new_sandbox"
);
app_route!(
    /// A sandbox's page.
    sandbox, "/sandboxes/{name}", "dashboard_sandbox",
    ("name", "The sandbox's name or id")
);
app_route!(
    /// A deployment's page: its steps and its live log.
    deployment, "/deployments/{id}", "dashboard_deployment",
    ("id", "The deployment's id (`dep_…`)")
);
app_route!(
    /// The agents.
    agents, "/agents", "dashboard_agents"
);
app_route!(
    /// The delivery log of push webhooks and polling.
    hooks, "/hooks", "dashboard_hooks"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_names_the_current_version_and_every_module_it_imports_is_embedded() {
        let bundle = &*BUNDLE;
        assert!(
            bundle
                .index
                .contains(&format!("/assets/{}/main.js", bundle.version))
        );
        assert!(!bundle.index.contains("{{"), "a placeholder is left");
        // Every relative import of every module names an embedded file.
        for (name, _, body) in FILES {
            let text = std::str::from_utf8(body).expect("UTF-8");
            for target in relative_imports(text) {
                assert!(
                    bundle.assets.contains_key(target.as_str()),
                    "{name} imports {target}, which is not embedded"
                );
            }
        }
    }

    /// The `./x.js` of each `from './x.js'` in `text`.
    fn relative_imports(text: &str) -> Vec<String> {
        text.match_indices("from './")
            .map(|(at, m)| {
                let rest = &text[at + m.len()..];
                rest[..rest.find('\'').expect("a closing quote")].to_owned()
            })
            .collect()
    }

    #[test]
    fn a_matching_etag_is_not_modified_and_another_is_not() {
        let etag = etag_of(b"x");
        let mut headers = HeaderMap::new();
        assert!(!fresh(&headers, &etag));
        headers.insert(header::IF_NONE_MATCH, HeaderValue::from_static("\"other\""));
        assert!(!fresh(&headers, &etag));
        let listed = format!("\"other\", W/{}", etag.to_str().unwrap());
        headers.insert(header::IF_NONE_MATCH, listed.parse().unwrap());
        assert!(fresh(&headers, &etag));
    }
}

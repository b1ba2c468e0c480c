//! Push webhooks (SPEC §11): `POST /api/hooks/bitbucket` takes Bitbucket Server's
//! `repo:refs_changed` and Bitbucket Cloud's `repo:push`, and `GET /api/hooks/deliveries` is
//! the delivery log.
//!
//! A delivery carries no session: it is believed only when `X-Hub-Signature` is the
//! HMAC-SHA256 of its body under `[webhooks] secret`, checked in constant time before the
//! body is parsed. A refused one gets 401 and triggers nothing; it is still recorded (without
//! its body, at most [`REFUSALS_PER_MINUTE`] a minute), so that an operator can see why a
//! push did not fire. Deliveries are deduplicated by their id (`X-Request-Id`, or Cloud's
//! `X-Hook-UUID`): a replay of a valid one is recorded as a duplicate and triggers nothing.
//!
//! A delivery's repository is matched to catalog services by [`repo_key`] (host and path
//! without `.git`, case-insensitive) of Server's clone links or Cloud's html link. The log
//! keeps a repository's name and refs only when the catalog has the repository: what is
//! shown to every user is what the catalog already tells them.

use std::sync::Mutex;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use hmac::{KeyInit, Mac};
use sdp_api::{Delivery, DeliveryRef, ErrorBody, ListParams, Page};
use sdp_protocol::{BranchName, ServiceName};
use serde::Deserialize;
use time::OffsetDateTime;

use super::{AppState, rfc3339};
use crate::db::{DeliveryRow, NewDelivery};
use crate::error::{ApiError, MAX_BODY_BYTES};
use crate::lifecycle::{repo_key, short};
use crate::metrics::DeliveryResult;

/// Refused deliveries recorded per minute at most; past it they are refused unrecorded.
pub const REFUSALS_PER_MINUTE: u32 = 30;

/// Refs of one delivery kept in the log at most.
const MAX_REFS: usize = 50;

/// The longest outcome kept, in characters.
const MAX_OUTCOME: usize = 2000;

/// The refused deliveries recorded in the current minute: `(minute, count)`.
#[derive(Default)]
pub(crate) struct Refusals(Mutex<(i64, u32)>);

impl Refusals {
    /// Whether one more refused delivery may be recorded now.
    fn take(&self) -> bool {
        let minute = OffsetDateTime::now_utc().unix_timestamp() / 60;
        let mut seen = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if seen.0 != minute {
            *seen = (minute, 0);
        }
        seen.1 += 1;
        seen.1 <= REFUSALS_PER_MINUTE
    }
}

/// A header's value when it is short and plain (an id or an event key); anything else is
/// not kept.
fn plain_header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    let value = headers.get(name)?.to_str().ok()?.trim();
    let plain = !value.is_empty()
        && value.len() <= 128
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:{}".contains(&b));
    plain.then_some(value)
}

/// `valid`, `invalid` or `missing`: the body's signature under `secret`.
fn signature(headers: &HeaderMap, secret: &str, body: &[u8]) -> &'static str {
    let Some(presented) = headers.get("x-hub-signature") else {
        return "missing";
    };
    let Some(hex_digest) = presented
        .to_str()
        .ok()
        .and_then(|v| v.trim().strip_prefix("sha256="))
    else {
        return "invalid";
    };
    let Ok(digest) = hex::decode(hex_digest) else {
        return "invalid";
    };
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes())
        .expect("HMAC takes a key of any length");
    mac.update(body);
    // Constant time: how much of a guess matched never shows in how long it took.
    match mac.verify_slice(&digest) {
        Ok(()) => "valid",
        Err(_) => "invalid",
    }
}

// Bitbucket Server's `repo:refs_changed`: only what is read of it.
#[derive(Deserialize)]
struct ServerPush {
    repository: ServerRepository,
    #[serde(default)]
    changes: Vec<ServerChange>,
}

#[derive(Deserialize)]
struct ServerRepository {
    #[serde(default)]
    links: ServerLinks,
}

#[derive(Deserialize, Default)]
struct ServerLinks {
    #[serde(default)]
    clone: Vec<Href>,
}

#[derive(Deserialize)]
struct Href {
    href: String,
}

#[derive(Deserialize)]
struct ServerChange {
    #[serde(rename = "ref")]
    reference: ServerRef,
    #[serde(rename = "toHash", default)]
    to_hash: Option<String>,
    #[serde(rename = "type", default)]
    kind: String,
}

#[derive(Deserialize)]
struct ServerRef {
    id: String,
    #[serde(rename = "type", default)]
    kind: String,
}

// Bitbucket Cloud's `repo:push`.
#[derive(Deserialize)]
struct CloudPush {
    repository: CloudRepository,
    push: CloudChanges,
}

#[derive(Deserialize)]
struct CloudRepository {
    #[serde(default)]
    links: CloudLinks,
}

#[derive(Deserialize, Default)]
struct CloudLinks {
    html: Option<Href>,
}

#[derive(Deserialize)]
struct CloudChanges {
    #[serde(default)]
    changes: Vec<CloudChange>,
}

#[derive(Deserialize)]
struct CloudChange {
    new: Option<CloudSide>,
    old: Option<CloudSide>,
}

#[derive(Deserialize)]
struct CloudSide {
    #[serde(rename = "type")]
    kind: String,
    name: String,
    target: Option<CloudTarget>,
}

#[derive(Deserialize)]
struct CloudTarget {
    hash: String,
}

/// A ref change of either payload, before it is checked.
struct Change {
    /// `refs/heads/x` or Cloud's `x` of type `branch`; `None` for a tag.
    branch: Option<String>,
    commit: Option<String>,
    /// `update`, `add` or `delete`.
    change: &'static str,
}

/// What a push payload names: its repository's URLs and its changes.
struct Push {
    urls: Vec<String>,
    changes: Vec<Change>,
}

fn server_push(body: &[u8]) -> Result<Push, serde_json::Error> {
    let p: ServerPush = serde_json::from_slice(body)?;
    let changes = p
        .changes
        .into_iter()
        .map(|c| {
            let deleted = c.kind.eq_ignore_ascii_case("DELETE")
                || c.to_hash
                    .as_deref()
                    .is_some_and(|h| h.bytes().all(|b| b == b'0'));
            let branch = (c.reference.kind.is_empty() || c.reference.kind == "BRANCH")
                .then(|| {
                    c.reference
                        .id
                        .strip_prefix("refs/heads/")
                        .map(str::to_owned)
                })
                .flatten();
            Change {
                branch,
                commit: c.to_hash.filter(|_| !deleted),
                change: if deleted {
                    "delete"
                } else if c.kind.eq_ignore_ascii_case("ADD") {
                    "add"
                } else {
                    "update"
                },
            }
        })
        .collect();
    Ok(Push {
        urls: p
            .repository
            .links
            .clone
            .into_iter()
            .map(|l| l.href)
            .collect(),
        changes,
    })
}

fn cloud_push(body: &[u8]) -> Result<Push, serde_json::Error> {
    let p: CloudPush = serde_json::from_slice(body)?;
    let changes = p
        .push
        .changes
        .into_iter()
        .filter_map(|c| {
            let (side, change) = match (c.new, c.old) {
                (Some(new), Some(_)) => (new, "update"),
                (Some(new), None) => (new, "add"),
                (None, Some(old)) => (old, "delete"),
                (None, None) => return None,
            };
            Some(Change {
                branch: (side.kind == "branch").then_some(side.name),
                commit: side.target.map(|t| t.hash).filter(|_| change != "delete"),
                change,
            })
        })
        .collect();
    Ok(Push {
        urls: p
            .repository
            .links
            .html
            .into_iter()
            .map(|l| l.href)
            .collect(),
        changes,
    })
}

fn is_commit(s: &str) -> bool {
    (7..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn cut(mut s: String) -> String {
    if let Some((i, _)) = s.char_indices().nth(MAX_OUTCOME) {
        s.truncate(i);
        s.push('…');
    }
    s
}

fn delivery_view(row: DeliveryRow) -> Delivery {
    Delivery {
        id: row.id.to_string(),
        source: row.source,
        received_at: rfc3339(row.received_at),
        delivery_id: row.delivery_id,
        event: row.event,
        repository: row.repository,
        services: serde_json::from_str(&row.services).unwrap_or_default(),
        refs: serde_json::from_str(&row.refs).unwrap_or_default(),
        signature: row.signature,
        outcome: row.outcome,
    }
}

async fn answer(state: &AppState, status: StatusCode, id: i64) -> Result<Response, ApiError> {
    let row = state
        .db
        .delivery(id)
        .await?
        .ok_or_else(|| ApiError::not_found("unknown_delivery", "the delivery was pruned"))?;
    Ok((status, Json(delivery_view(row))).into_response())
}

/// A Bitbucket push webhook: Server's `repo:refs_changed` or Cloud's `repo:push`. Each
/// branch it moves redeploys the sandboxes whose service follows that branch, with their
/// owners' credentials (or the commit waits for the owner's login).
#[utoipa::path(
    post,
    path = "/api/hooks/bitbucket",
    operation_id = "bitbucket_webhook",
    tag = "hooks",
    params(
        ("x-hub-signature" = Option<String>, Header, description = "`sha256=<hex>`: the HMAC-SHA256 of the body under `[webhooks] secret`"),
        ("x-event-key" = Option<String>, Header, description = "`repo:refs_changed` (Bitbucket Server) or `repo:push` (Cloud); other events are logged and trigger nothing", example = "repo:refs_changed"),
        ("x-request-id" = Option<String>, Header, description = "Bitbucket Server's delivery id: a delivery of an id seen before triggers nothing"),
        ("x-hook-uuid" = Option<String>, Header, description = "Bitbucket Cloud's delivery id, when there is no `X-Request-Id`"),
    ),
    request_body(content = String, description = "The push event as Bitbucket sends it (JSON), with `X-Event-Key`, `X-Request-Id` or `X-Hook-UUID`, and `X-Hub-Signature: sha256=<HMAC-SHA256 of the body under [webhooks] secret>`", content_type = "application/json"),
    responses(
        (status = 202, description = "Taken: the delivery as recorded, with what it triggered or why nothing", body = Delivery),
        (status = 400, description = "`invalid_payload`: a signed delivery whose body is not the event its key names", body = ErrorBody),
        (status = 401, description = "`invalid_signature`: `X-Hub-Signature` is missing or does not match the body; nothing is triggered", body = ErrorBody),
        (status = 404, description = "`webhooks_off`: this server has no `[webhooks] secret`", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: the body is over 1 MiB", body = ErrorBody),
    )
)]
pub async fn bitbucket(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Some(secret) = &state.config.webhooks.secret else {
        return Err(ApiError::not_found(
            "webhooks_off",
            "push webhooks are off on this server: it has no `[webhooks] secret` (SDP_WEBHOOKS__SECRET)",
        ));
    };
    let body = body.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("a delivery's body may be at most {MAX_BODY_BYTES} bytes"),
        )
    })?;
    let event = plain_header(&headers, "x-event-key");
    let delivery_id = plain_header(&headers, "x-request-id")
        .or_else(|| plain_header(&headers, "x-hook-uuid"))
        .or_else(|| plain_header(&headers, "x-request-uuid"));
    let signature = signature(&headers, secret.expose(), &body);
    if signature != "valid" {
        tracing::warn!(
            signature,
            event,
            delivery = delivery_id,
            "webhook delivery refused"
        );
        state.metrics.delivery(if signature == "missing" {
            DeliveryResult::Missing
        } else {
            DeliveryResult::Invalid
        });
        if state.hook_refusals.take() {
            let outcome = match signature {
                "missing" => "refused: no X-Hub-Signature",
                _ => "refused: X-Hub-Signature does not match the body under the secret",
            };
            let refused = NewDelivery {
                source: "webhook",
                delivery_id,
                event,
                repository: None,
                services: "[]",
                refs: "[]",
                signature,
                outcome,
            };
            state.db.record_delivery(&refused).await?;
        }
        return Err(ApiError::unauthorized(
            "invalid_signature",
            "X-Hub-Signature must be sha256=<hex HMAC-SHA256 of the body under the webhook secret>",
        ));
    }
    let received = NewDelivery {
        source: "webhook",
        delivery_id,
        event,
        repository: None,
        services: "[]",
        refs: "[]",
        signature,
        outcome: "received",
    };
    let (id, duplicate) = state.db.record_delivery(&received).await?;
    if duplicate {
        state.metrics.delivery(DeliveryResult::Duplicate);
        state
            .db
            .finish_delivery(
                id,
                None,
                "[]",
                "[]",
                "duplicate delivery: nothing triggered",
            )
            .await?;
        return answer(&state, StatusCode::ACCEPTED, id).await;
    }
    state.metrics.delivery(DeliveryResult::Valid);
    let parsed = match event {
        Some("repo:refs_changed") => server_push(&body),
        Some("repo:push") => cloud_push(&body),
        other => {
            let outcome = match other {
                Some("diagnostics:ping") => "ping: webhooks reach SDP".to_owned(),
                Some(key) => format!("event {key} is not a push: nothing triggered"),
                None => "no X-Event-Key: nothing triggered".to_owned(),
            };
            state
                .db
                .finish_delivery(id, None, "[]", "[]", &outcome)
                .await?;
            return answer(&state, StatusCode::ACCEPTED, id).await;
        }
    };
    let push = match parsed {
        Ok(push) => push,
        Err(e) => {
            let outcome = "payload not understood: nothing triggered";
            state
                .db
                .finish_delivery(id, None, "[]", "[]", outcome)
                .await?;
            return Err(ApiError::bad_request(
                "invalid_payload",
                format!("the body is not a {} event: {e}", event.unwrap_or_default()),
            ));
        }
    };
    let keys: Vec<String> = push.urls.iter().filter_map(|u| repo_key(u)).collect();
    let services: Vec<&ServiceName> = state
        .config
        .services
        .iter()
        .filter(|s| repo_key(s.repo.as_str()).is_some_and(|k| keys.contains(&k)))
        .map(|s| &s.name)
        .collect();
    let Some(first) = services.first() else {
        let outcome = "no catalog service has this repository: nothing triggered";
        state
            .db
            .finish_delivery(id, None, "[]", "[]", outcome)
            .await?;
        return answer(&state, StatusCode::ACCEPTED, id).await;
    };
    let repository = state
        .config
        .service(first.as_str())
        .and_then(|s| repo_key(s.repo.as_str()));
    let mut refs = Vec::new();
    let mut did = Vec::new();
    for change in push.changes {
        let Some(branch) = change.branch else {
            did.push("a ref that is not a branch: ignored".to_owned());
            continue;
        };
        let Ok(branch) = BranchName::parse(branch) else {
            did.push("a branch name git would refuse: ignored".to_owned());
            continue;
        };
        let commit = change.commit.filter(|c| is_commit(c));
        if refs.len() < MAX_REFS {
            refs.push(DeliveryRef {
                branch: branch.to_string(),
                commit: commit.clone(),
                change: change.change.to_owned(),
            });
        }
        match commit {
            _ if change.change == "delete" => {
                did.push(format!("branch {branch} deleted: nothing to deploy"))
            }
            None => did.push(format!("branch {branch} names no commit: ignored")),
            Some(commit) => {
                let mut followed = Vec::new();
                for service in &services {
                    tracing::info!(%service, %branch, commit = short(&commit), delivery = delivery_id, "push received");
                    followed.extend(state.lifecycle.pushed(service, &branch, &commit).await);
                }
                // Services that share the repository and that nobody follows are noise
                // beside one that redeployed; when none did, they are the reason.
                if followed.is_empty() {
                    let names: Vec<String> =
                        services.iter().map(|s| format!("{s}@{branch}")).collect();
                    did.push(format!("no sandbox follows {}", names.join(" or ")));
                }
                did.extend(followed);
            }
        }
    }
    if did.is_empty() {
        did.push("no branch changed: nothing triggered".to_owned());
    }
    let names: Vec<&str> = services.iter().map(|s| s.as_str()).collect();
    let names = serde_json::to_string(&names).unwrap_or_else(|_| "[]".into());
    let refs = serde_json::to_string(&refs).unwrap_or_else(|_| "[]".into());
    state
        .db
        .finish_delivery(
            id,
            repository.as_deref(),
            &names,
            &refs,
            &cut(did.join("; ")),
        )
        .await?;
    answer(&state, StatusCode::ACCEPTED, id).await
}

fn parse_cursor(raw: &str) -> Option<(i64, i64)> {
    let (t, id) = raw.split_once('.')?;
    Some((t.parse().ok()?, id.parse().ok()?))
}

/// The delivery log, newest first: every webhook delivery and polling trigger of the last 7
/// days, with its signature's result and what it triggered (or why nothing). `owner` and
/// `state` filter nothing here.
#[utoipa::path(
    get,
    path = "/api/hooks/deliveries",
    operation_id = "list_deliveries",
    tag = "hooks",
    params(ListParams),
    responses(
        (status = 200, description = "A page of deliveries", body = Page<Delivery>),
        (status = 400, description = "`invalid_query`, `invalid_limit` or `invalid_cursor`", body = ErrorBody),
    )
)]
pub async fn deliveries(
    State(state): State<AppState>,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<Page<Delivery>>, ApiError> {
    let Query(params) =
        params.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let (limit, after) =
        super::sandboxes::page_bounds(params.limit, params.cursor.as_deref(), parse_cursor)?;
    let rows = state.db.list_deliveries(limit, after).await?;
    let next = (rows.len() == limit as usize)
        .then(|| {
            rows.last()
                .map(|r| format!("{}.{}", crate::db::to_millis(r.received_at), r.id))
        })
        .flatten();
    Ok(Json(Page {
        items: rows.into_iter().map(delivery_view).collect(),
        next,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_is_valid_only_for_this_body_under_this_secret() {
        let body = br#"{"eventKey":"repo:refs_changed"}"#;
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"s3cret").unwrap();
        mac.update(body);
        let good = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        let with = |value: &str| {
            let mut h = HeaderMap::new();
            h.insert("x-hub-signature", value.parse().unwrap());
            h
        };
        assert_eq!(signature(&with(&good), "s3cret", body), "valid");
        assert_eq!(signature(&with(&good), "other", body), "invalid");
        assert_eq!(signature(&with(&good), "s3cret", b"{}"), "invalid");
        assert_eq!(signature(&with("sha256=zz"), "s3cret", body), "invalid");
        assert_eq!(signature(&with(&good[7..]), "s3cret", body), "invalid");
        assert_eq!(signature(&HeaderMap::new(), "s3cret", body), "missing");
    }

    #[test]
    fn refused_deliveries_are_recorded_at_most_so_many_a_minute() {
        let refusals = Refusals::default();
        let recorded = (0..100).filter(|_| refusals.take()).count();
        // A minute may turn during the loop, and give a few more.
        assert!(
            (REFUSALS_PER_MINUTE as usize..=2 * REFUSALS_PER_MINUTE as usize).contains(&recorded),
            "{recorded}"
        );
    }

    #[test]
    fn a_server_push_names_branches_commits_and_deletions() {
        let body = br#"{"eventKey":"repo:refs_changed","repository":{"slug":"orders","project":{"key":"SHOP"},
            "links":{"clone":[{"href":"https://bb.example.com/scm/shop/orders.git","name":"http"},
                              {"href":"ssh://git@bb.example.com:7999/shop/orders.git","name":"ssh"}]}},
            "changes":[
              {"ref":{"id":"refs/heads/feature/x","displayId":"feature/x","type":"BRANCH"},"fromHash":"aaaaaaa","toHash":"bbbbbbbbbb","type":"UPDATE"},
              {"ref":{"id":"refs/heads/gone","displayId":"gone","type":"BRANCH"},"fromHash":"aaaaaaa","toHash":"0000000000000000000000000000000000000000","type":"DELETE"},
              {"ref":{"id":"refs/tags/v1","displayId":"v1","type":"TAG"},"fromHash":"0000000","toHash":"ccccccc","type":"ADD"}]}"#;
        let push = server_push(body).unwrap();
        assert_eq!(push.urls.len(), 2);
        assert_eq!(push.changes[0].branch.as_deref(), Some("feature/x"));
        assert_eq!(push.changes[0].commit.as_deref(), Some("bbbbbbbbbb"));
        assert_eq!(push.changes[1].change, "delete");
        assert_eq!(push.changes[1].commit, None);
        assert_eq!(push.changes[2].branch, None);
    }

    #[test]
    fn a_cloud_push_names_branches_commits_and_deletions() {
        let body = br#"{"repository":{"full_name":"shop/orders","links":{"html":{"href":"https://bitbucket.org/shop/orders"}}},
            "push":{"changes":[
              {"new":{"type":"branch","name":"main","target":{"hash":"dddddddd"}},"old":{"type":"branch","name":"main","target":{"hash":"eeeeeee"}}},
              {"new":null,"old":{"type":"branch","name":"old","target":{"hash":"eeeeeee"}}}]}}"#;
        let push = cloud_push(body).unwrap();
        assert_eq!(push.urls, ["https://bitbucket.org/shop/orders"]);
        assert_eq!(push.changes[0].branch.as_deref(), Some("main"));
        assert_eq!(push.changes[0].commit.as_deref(), Some("dddddddd"));
        assert_eq!(push.changes[1].change, "delete");
        assert_eq!(push.changes[1].commit, None);
    }
}

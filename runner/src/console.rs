//! The web console at `/`: one server-rendered page with a little JavaScript (no assets from
//! the network) over a small JSON API. Reading needs nothing; actions (retry, skip) need the
//! configured `console_token` as `Authorization: Bearer TOKEN`, and are refused when none is
//! configured. Actions: retry and skip a dead letter, pause and resume a projection.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Json, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;

use crate::observe::Observed;

type Shared = State<Arc<Observed>>;

pub(crate) fn routes() -> Router<Arc<Observed>> {
    Router::new()
        .route("/", get(page))
        .route("/api/status", get(status))
        .route("/api/dead-letters/{projection}", get(dead_letters))
        .route("/api/dead-letters/{projection}/{id}", get(show))
        .route("/api/dead-letters/{projection}/{id}/retry", post(retry))
        .route("/api/dead-letters/{projection}/{id}/skip", post(skip))
        .route("/api/projections/{projection}/pause", post(pause))
        .route("/api/projections/{projection}/resume", post(resume))
        .route("/api/streams", get(streams))
        .route("/api/streams/{stream}", get(read))
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> Response {
    (status, Json(json!({ "error": message.to_string() }))).into_response()
}

/// The refusal of an action without the configured token (or when none is configured).
fn refused(observed: &Observed, headers: &HeaderMap) -> Option<Response> {
    let Some(token) = &observed.token else {
        return Some(error(StatusCode::FORBIDDEN, "the console is read-only: no console_token is configured"));
    };
    let given = headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    (given != Some(token.as_str())).then(|| error(StatusCode::UNAUTHORIZED, "this action needs the console token"))
}

async fn page(State(observed): Shared) -> Html<String> {
    Html(PAGE.replace("{{ACTIONS}}", if observed.token.is_some() { "true" } else { "false" }))
}

async fn status(State(observed): Shared) -> Response {
    let snapshot = observed.snapshot().await;
    let reasons = crate::observe::not_ready(&snapshot, &observed.health);
    // Like the snapshot's, a failure to read the rebuild records is shown, not a failed page.
    let (rebuilds, rebuilds_error) = match crate::observe::rebuilds(&*observed.store, None).await {
        Ok(rebuilds) => (rebuilds, None),
        Err(e) => (Vec::new(), Some(e.report())),
    };
    Json(json!({ "snapshot": snapshot, "not_ready": reasons, "rebuilds": rebuilds, "rebuilds_error": rebuilds_error }))
        .into_response()
}

async fn dead_letters(State(observed): Shared, Path(projection): Path<String>) -> Response {
    match observed.store.dead_letters(&projection).await {
        Ok(dead) => Json(
            dead.iter()
                .map(|d| {
                    json!({ "id": d.id, "stream": d.stream.as_str(), "version": d.version, "partition": d.partition,
                            "attempts": d.attempts, "error": d.error, "parked_at": d.parked_at.to_rfc3339() })
                })
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

async fn show(State(observed): Shared, Path((projection, id)): Path<(String, i64)>) -> Response {
    let dead = match observed.store.dead_letters(&projection).await {
        Ok(dead) => dead.into_iter().find(|d| d.id == id),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    let Some(dead) = dead else { return error(StatusCode::NOT_FOUND, format!("no dead letter {id}")) };
    match crate::dead_letters::show(&observed.database, &dead).await {
        Ok(value) => Json(value).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.report()),
    }
}

async fn retry(State(observed): Shared, headers: HeaderMap, Path((projection, id)): Path<(String, i64)>) -> Response {
    if let Some(refusal) = refused(&observed, &headers) {
        return refusal;
    }
    let Some(handler) = observed.handlers.iter().find(|p| p.name() == projection) else {
        return error(StatusCode::NOT_FOUND, format!("no projection named {projection:?}"));
    };
    let events = observed.database.events();
    match annal_projections::retry_dead_letter(&*events, &*observed.store, &**handler, id).await {
        Ok(annal_projections::Applied::Failed(e)) => error(StatusCode::CONFLICT, format!("failed again: {e}")),
        Ok(_) => Json(json!({ "retried": id })).into_response(),
        Err(e) => error(StatusCode::CONFLICT, e),
    }
}

async fn skip(State(observed): Shared, headers: HeaderMap, Path((projection, id)): Path<(String, i64)>) -> Response {
    if let Some(refusal) = refused(&observed, &headers) {
        return refusal;
    }
    match annal_projections::skip_dead_letter(&*observed.store, &projection, id).await {
        Ok(()) => Json(json!({ "skipped": id })).into_response(),
        Err(e) => error(StatusCode::NOT_FOUND, e),
    }
}

async fn pause(State(observed): Shared, headers: HeaderMap, Path(projection): Path<String>) -> Response {
    if let Some(refusal) = refused(&observed, &headers) {
        return refusal;
    }
    if !observed.projections.iter().any(|(name, _, _)| *name == projection) {
        return error(StatusCode::NOT_FOUND, format!("no projection named {projection:?}"));
    }
    let pause = annal_projections::Pause::new("the console", "paused from the console");
    match observed.store.pause(&projection, &pause).await {
        Ok(()) => Json(json!({ "paused": projection })).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

async fn resume(State(observed): Shared, headers: HeaderMap, Path(projection): Path<String>) -> Response {
    if let Some(refusal) = refused(&observed, &headers) {
        return refusal;
    }
    match observed.store.resume(&projection).await {
        Ok(true) => Json(json!({ "resumed": projection })).into_response(),
        Ok(false) => error(StatusCode::CONFLICT, format!("{projection} is not paused")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

#[derive(Deserialize)]
struct StreamsQuery {
    category: Option<String>,
}

async fn streams(State(observed): Shared, Query(query): Query<StreamsQuery>) -> Response {
    match observed.database.streams(query.category.as_deref()).await {
        Ok(rows) => Json(
            rows.into_iter().map(|(c, s, n)| json!({ "category": c, "stream": s, "events": n })).collect::<Vec<_>>(),
        )
        .into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.report()),
    }
}

#[derive(Deserialize)]
struct ReadQuery {
    from: Option<u64>,
}

async fn read(State(observed): Shared, Path(stream): Path<String>, Query(query): Query<ReadQuery>) -> Response {
    match crate::browse::read_stream(&observed.database, &stream, query.from.unwrap_or(0), 100).await {
        Ok(events) => Json(events).into_response(),
        Err(e) => error(StatusCode::BAD_REQUEST, e.report()),
    }
}

const PAGE: &str = include_str!("console.html");

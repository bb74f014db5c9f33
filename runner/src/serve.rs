//! The HTTP server of `run`: health, Prometheus `/metrics` and the console, until SIGINT or
//! SIGTERM.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;

use crate::observe::{Observed, not_ready};
use crate::{Error, Result};

/// Serves `/health/live`, `/health/ready` (and its alias `/health`) and `/metrics` until SIGINT
/// or SIGTERM.
pub(crate) async fn serve(listen: &str, observed: Observed) -> Result<()> {
    let handle = crate::metrics::install()?;
    let observed = Arc::new(observed);
    let metrics = move |State(observed): State<Arc<Observed>>| async move {
        crate::metrics::render(handle, &observed.snapshot().await)
    };
    let app = axum::Router::new()
        .route("/health/live", get(|| async { Json(serde_json::json!({ "status": "live" })) }))
        .route("/health/ready", get(ready))
        .route("/health", get(ready))
        .route("/metrics", get(metrics))
        .merge(crate::console::routes())
        .with_state(observed);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| Error::Listen { address: listen.to_owned(), source })?;
    let address = listener.local_addr().map_or_else(|_| listen.to_owned(), |a| a.to_string());
    tracing::info!(%address, "serving /health, /metrics and the console");
    axum::serve(listener, app).with_graceful_shutdown(shutdown_signal()).await.map_err(Error::Serve)?;
    tracing::info!("shutting down: finishing in-flight batches and releasing leases");
    Ok(())
}

/// Readiness: 200 `{"status":"ready"}`, or 503 with every reason found.
async fn ready(State(observed): State<Arc<Observed>>) -> Response {
    let snapshot = observed.snapshot().await;
    let reasons = not_ready(&snapshot, &observed.health);
    if reasons.is_empty() {
        (StatusCode::OK, Json(serde_json::json!({ "status": "ready" }))).into_response()
    } else {
        let body = serde_json::json!({ "status": "not_ready", "reasons": reasons });
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    }
}

pub(crate) async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => {}
        () = terminate => {}
    }
}

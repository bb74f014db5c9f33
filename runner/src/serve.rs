//! The HTTP server of `run`: health, Prometheus `/metrics` and the console, until SIGINT or
//! SIGTERM.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;

use crate::observe::{Observed, not_ready};
use crate::{Error, Result};

/// Serves `/health/live`, `/health/ready` (and its alias `/health`) and `/metrics` until `stop`
/// resolves (see [`shutdown_signal`]).
pub(crate) async fn serve(
    listen: &str,
    observed: Observed,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let handle = crate::metrics::install()?;
    crate::metrics::register_backend(if observed.database.is_postgres() { "postgres" } else { "sqlite" });
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
    axum::serve(listener, app).with_graceful_shutdown(stop).await.map_err(Error::Serve)?;
    tracing::info!("shutting down: finishing in-flight batches and releasing leases");
    Ok(())
}

/// Readiness: 200 `{"status":"ready"}`, or 503 with every reason found; both list the paused
/// projections (`"paused": [...]`), which are not a reason by themselves.
async fn ready(State(observed): State<Arc<Observed>>) -> Response {
    let snapshot = observed.snapshot().await;
    let reasons = not_ready(&snapshot, &observed.health);
    let paused: Vec<&str> =
        snapshot.projections.iter().filter(|p| p.paused.is_some()).map(|p| p.name.as_str()).collect();
    if reasons.is_empty() {
        (StatusCode::OK, Json(serde_json::json!({ "status": "ready", "paused": paused }))).into_response()
    } else {
        let body = serde_json::json!({ "status": "not_ready", "reasons": reasons, "paused": paused });
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    }
}

/// Resolves at the first SIGINT or SIGTERM. The handlers are installed when this is called, not
/// when the future is first polled: call it before starting any work, so that a signal that
/// arrives early is a graceful shutdown rather than the default action, which kills the process.
pub(crate) fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let interrupt = signal(SignalKind::interrupt()).ok();
        let terminate = signal(SignalKind::terminate()).ok();
        async move {
            let wait = |s: Option<tokio::signal::unix::Signal>| async move {
                match s {
                    Some(mut s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                () = wait(interrupt) => {}
                () = wait(terminate) => {}
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

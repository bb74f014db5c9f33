//! The HTTP server of `run`: `/health` and Prometheus `/metrics`, until SIGINT or SIGTERM.

use std::sync::Arc;

use annal_projections::RunningProjections;

use crate::{Error, Result};

/// Serves /health and /metrics until SIGINT or SIGTERM.
pub(crate) async fn serve(listen: &str, running: Arc<RunningProjections>, names: Vec<String>) -> Result<()> {
    use axum::http::StatusCode;
    use axum::routing::get;

    let health = {
        let (running, names) = (running.clone(), names.clone());
        move || async move {
            let stopped: Vec<&String> = names.iter().filter(|n| !running.is_running(n).unwrap_or(false)).collect();
            if stopped.is_empty() {
                (StatusCode::OK, "ok\n".to_owned())
            } else {
                (StatusCode::SERVICE_UNAVAILABLE, format!("stopped: {stopped:?}\n"))
            }
        }
    };
    let metrics = {
        let running = running.clone();
        move || async move { crate::metrics::text(&running, &names).await }
    };
    let app = axum::Router::new().route("/health", get(health)).route("/metrics", get(metrics));
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| Error::Listen { address: listen.to_owned(), source })?;
    tracing::info!(address = %listen, "serving /health and /metrics");
    axum::serve(listener, app).with_graceful_shutdown(shutdown_signal()).await.map_err(Error::Serve)?;
    tracing::info!("shutting down: finishing in-flight batches and releasing leases");
    Ok(())
}

async fn shutdown_signal() {
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

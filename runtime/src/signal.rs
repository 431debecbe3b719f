//! Shutdown on SIGTERM (Kubernetes, systemd) or SIGINT (a terminal).

/// Resolves on the first SIGTERM or SIGINT. If the handlers cannot be installed it falls back
/// to Ctrl-C alone, so a process can always be stopped.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => {}
                _ = i.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

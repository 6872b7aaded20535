//! The signals that end a daemon: SIGTERM (what `systemctl stop` sends)
//! and SIGINT.

/// Completes at the first SIGTERM or SIGINT. The handlers are installed on
/// the first poll; before that the default action applies.
pub async fn shutdown() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

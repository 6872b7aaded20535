//! The signals that end a daemon: SIGTERM (what `systemctl stop` sends)
//! and SIGINT.

/// Completes at the first SIGTERM or SIGINT. The handlers are installed
/// when this is called (inside a tokio runtime), not when it is first
/// polled: a SIGTERM that comes while the daemon is still starting is a
/// clean stop, not the default action's kill.
pub fn shutdown() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            (Ok(mut term), Err(_)) => {
                term.recv().await;
            }
            (Err(_), Ok(mut int)) => {
                int.recv().await;
            }
            (Err(_), Err(_)) => std::future::pending().await,
        }
    }
}

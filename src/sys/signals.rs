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

/// For commands that only print (`status`, `verify`, `factory-row`): a
/// closed stdout (`fleetd status | head -n 1`) ends the process as it ends
/// `cat`, by SIGPIPE, instead of a panic on the failed write (an abort in
/// the release build). Rust starts every program with SIGPIPE ignored.
pub fn end_quietly_on_closed_stdout() {
    // SAFETY: sets the disposition of one signal to its default, before
    // any thread is started; no handler runs.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

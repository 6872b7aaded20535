//! The executor's waits on the world outside: the reboot command, the
//! health command (child processes), and the broker connection the health
//! check may need, each raced against the agent's timers.

use super::{narration, ActionError, Executor};
use crate::config::RebootMethod;
use crate::update::agent::{Input, Timer};
use std::future::Future;

impl Executor {
    pub(super) async fn reboot(&mut self) -> Result<(), ActionError> {
        let arg = self.boot.trial_reboot_arg().unwrap_or("");
        if self.no_reboot || self.config.update.reboot == RebootMethod::None {
            self.report_step(narration::REBOOT_DISABLED.into());
            return Ok(());
        }
        let mut command = match self.config.update.reboot {
            RebootMethod::Command => {
                let script = self.config.update.reboot_command.clone().unwrap_or_default();
                let mut c = tokio::process::Command::new("/bin/sh");
                c.args(["-c", &script]).env("FLEETD_REBOOT_ARG", arg);
                c
            }
            // systemctl asks systemd (logind/PID 1) over D-Bus to reboot.
            _ => {
                let mut c = tokio::process::Command::new("systemctl");
                c.arg("reboot");
                if !arg.is_empty() {
                    c.arg(arg);
                }
                c
            }
        };
        self.report_step(narration::REBOOTING.into());
        let status = command.status().await.map_err(|e| ActionError::RebootFailed(e.to_string()))?;
        if !status.success() {
            return Err(ActionError::RebootFailed(status.to_string()));
        }
        Ok(())
    }

    /// Waits for `work`, or for the earliest armed timer (`Err` with it).
    async fn before_timer<T>(&self, work: impl Future<Output = T>) -> Result<T, Timer> {
        let Some((&timer, &deadline)) = self.timers.iter().min_by_key(|(_, at)| **at) else {
            return Ok(work.await);
        };
        tokio::select! {
            done = work => Ok(done),
            _ = tokio::time::sleep_until(deadline) => Err(timer),
        }
    }

    pub(super) async fn health_command(&mut self) -> Input {
        let Some(command) = self.config.health.command.clone() else {
            return Input::HealthCommandDone { ok: true, detail: "no command".into() };
        };
        self.report_step(narration::running_health_check(&command));
        let child = tokio::process::Command::new(&command).kill_on_drop(true).status();
        match self.before_timer(child).await {
            Err(timer) => Input::TimerFired(timer),
            Ok(Err(e)) => {
                Input::HealthCommandDone { ok: false, detail: format!("{}: {e}", command.display()) }
            }
            Ok(Ok(status)) if status.success() => {
                Input::HealthCommandDone { ok: true, detail: "passed".into() }
            }
            Ok(Ok(status)) => {
                Input::HealthCommandDone { ok: false, detail: format!("{} {status}", command.display()) }
            }
        }
    }

    pub(super) async fn await_connection(&mut self) -> Input {
        let Some(mut gate) = self.health_gate.clone() else {
            return Input::Connected;
        };
        self.report_step(narration::AWAITING_CONNECTION.into());
        match self.before_timer(async move { gate.wait_for(|c| *c).await.is_ok() }).await {
            Ok(true) => Input::Connected,
            // The sender is gone (the daemon is stopping): only the timer ends this.
            Ok(false) => match self.before_timer(std::future::pending::<()>()).await {
                Err(timer) => Input::TimerFired(timer),
                Ok(()) => Input::Connected,
            },
            Err(timer) => Input::TimerFired(timer),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::fakes::World;
    use crate::boot::SlotState;
    use crate::update::engine::{Phase, Rollback};
    use crate::update::Source;
    use std::time::Duration;

    /// The health timer on tokio's paused clock: a command that never ends
    /// is judged when the timer fires, 20 virtual seconds later.
    #[tokio::test(start_paused = true)]
    async fn a_health_check_that_hangs_fails_at_its_timeout() {
        let w = World::new("command = \"hang\"\ntimeout_s = 20");
        let script = w.dir.path().join("hang");
        std::fs::write(&script, "#!/bin/sh\nexec sleep 1000\n").unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let mut ex = w.executor("A", "b1", w.source());
        ex.admit(&w.message(), Source::Local, || {}).await.unwrap();
        ex.run().await.unwrap();
        drop(ex);
        let mut trial = w.executor("B", "b2", w.source());
        let started = tokio::time::Instant::now();
        trial.start().await.unwrap();
        assert_eq!(started.elapsed(), Duration::from_secs(20), "judged exactly at the timer");
        assert_eq!(
            trial.job().unwrap().phase,
            Phase::RolledBack {
                reason: Rollback::Unhealthy("health-check-failed: timed out after 20 s".into())
            }
        );
        assert_eq!(w.boot.env.lock().unwrap()["B"], SlotState::Bad);
    }

    /// The daemon's gate: no broker connection within the timeout fails the trial.
    #[tokio::test(start_paused = true)]
    async fn a_trial_that_never_connects_fails_at_its_timeout() {
        let w = World::new("timeout_s = 30");
        let mut ex = w.executor("A", "b1", w.source());
        ex.admit(&w.message(), Source::Local, || {}).await.unwrap();
        ex.run().await.unwrap();
        drop(ex);
        let mut trial = w.executor("B", "b2", w.source());
        let (_connected_tx, connected) = tokio::sync::watch::channel(false);
        trial.set_health_gate(connected);
        let started = tokio::time::Instant::now();
        trial.start().await.unwrap();
        assert_eq!(started.elapsed(), Duration::from_secs(30));
        assert_eq!(
            trial.job().unwrap().phase,
            Phase::RolledBack {
                reason: Rollback::Unhealthy("health-check-failed: mqtt-not-connected within 30 s".into())
            }
        );
    }
}

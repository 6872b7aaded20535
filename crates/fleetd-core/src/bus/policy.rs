//! The D-Bus call policy: how the daemon answers each call (`Command`)
//! given what its update worker is doing (`Worker`). `decide` is pure; the
//! daemon's worker carries its `Decision` out (the executor acts, the job
//! stops, or the answer goes back at once), and the bus service asks it
//! while no worker runs yet.

use crate::update::agent::BusyView;

/// What a bus call asks of the update worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// An update message, as `fleetd install FILE` would take it.
    Install {
        message: Vec<u8>,
    },
    /// `MarkGood` / `MarkBad` of the booted slot.
    Mark {
        good: bool,
    },
    Cancel,
}

/// Why a call was not carried out; each becomes a named D-Bus error
/// (`org.fleetd.Daemon1.Error.<Variant>`). The text is `name: detail`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// Another job runs.
    #[error("{0}")]
    Busy(String),
    /// The message or the request was refused (verification, policy).
    #[error("{0}")]
    Refused(String),
    /// Nothing to act on, or too late for it.
    #[error("{0}")]
    NoJob(String),
    /// The update worker has not started (the device is provisioning).
    #[error("{0}")]
    NotReady(String),
    #[error("{0}")]
    Failed(String),
}

/// What the update worker is doing when a call arrives.
#[derive(Debug, Clone, Copy)]
pub enum Worker<'a> {
    /// Not started: the device provisions first.
    NotReady,
    /// Waiting for work: the executor is free.
    Idle,
    /// A job runs; the view is the one from the job's entry.
    Running(&'a BusyView),
    /// The job was stopped for this call (`StopJob`); the view is as of
    /// now, since a trial may have ended meanwhile (a rollback waiting on
    /// its reboot).
    Stopped(&'a BusyView),
}

/// What the worker does with a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The executor is free: carry the command out on it.
    CarryOut,
    /// The command acts on the running job (a verdict in its trial, a
    /// cancel before it): stop the job at its next await point, then decide
    /// again with `Worker::Stopped`.
    StopJob,
    /// Answered at once; a running job goes on untouched.
    Refuse(CommandError),
}

/// The policy, one command in one worker state.
pub fn decide(command: &Command, worker: Worker<'_>) -> Decision {
    use CommandError::{Busy, NoJob};
    match (worker, command) {
        (Worker::NotReady, _) => Decision::Refuse(not_ready()),
        (Worker::Idle, _) => Decision::CarryOut,
        (Worker::Running(busy), Command::Mark { .. }) if busy.in_trial => Decision::StopJob,
        (Worker::Running(busy), Command::Cancel) if busy.cancellable => Decision::StopJob,
        (Worker::Running(_), Command::Mark { .. }) => Decision::Refuse(Busy(
            "busy: an update is being installed; the booted slot is not on trial".into(),
        )),
        (Worker::Running(_), Command::Cancel) => Decision::Refuse(NoJob(
            "cancel-too-late: the booted slot is on trial; MarkBad gives it up".into(),
        )),
        (Worker::Running(busy), Command::Install { message }) => {
            Decision::Refuse(match busy.answer(message) {
                Ok(jti) => duplicate(&jti),
                Err(refusal) => Busy(refusal.to_string()),
            })
        }
        (Worker::Stopped(now), Command::Mark { .. }) if !now.in_trial => moved_on(),
        (Worker::Stopped(now), Command::Cancel) if !now.cancellable => moved_on(),
        (Worker::Stopped(_), _) => Decision::CarryOut,
    }
}

/// Any call that needs the update worker before it runs (the bus serves
/// reads while the device provisions).
pub fn not_ready() -> CommandError {
    CommandError::NotReady("not-ready: the update worker starts once the device is provisioned".into())
}

/// A second `Install` of a message already handled: refused, not run again.
pub fn duplicate(jti: &str) -> CommandError {
    CommandError::Refused(format!("duplicate: update {jti} was already handled; not run again"))
}

fn moved_on() -> Decision {
    Decision::Refuse(CommandError::NoJob(
        "moved-on: the job left the phase the call was for; read State and try again".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trust::Envelope;

    /// A message whose jti is `jti` (unsigned: the policy only peeks).
    fn message(jti: &str) -> Vec<u8> {
        Envelope::new(format!(r#"{{"jti":"{jti}"}}"#).as_bytes()).to_json().into_bytes()
    }

    /// The worker's states, with the views a job can show.
    fn states() -> Vec<(&'static str, BusyView)> {
        let known = || vec!["jti-old".to_string(), "jti-run".to_string()];
        let running = || Some(("jti-run".to_string(), 8));
        vec![
            // Downloading (or written, or waiting for the trial's reboot).
            ("before trial", BusyView::new(known(), running(), true, false)),
            ("in trial", BusyView::new(known(), running(), false, true)),
            // Neither: the trial ended (a rollback waiting on its reboot).
            ("past trial", BusyView::new(known(), running(), false, false)),
            // At start, before the stored job (if any) is known to run.
            ("resuming", BusyView::new(vec!["jti-old".into()], None, false, false)),
        ]
    }

    fn commands() -> Vec<(&'static str, Command)> {
        vec![
            ("install new", Command::Install { message: message("jti-new") }),
            ("install known", Command::Install { message: message("jti-old") }),
            ("install garbage", Command::Install { message: b"{not a message".to_vec() }),
            ("mark good", Command::Mark { good: true }),
            ("mark bad", Command::Mark { good: false }),
            ("cancel", Command::Cancel),
        ]
    }

    /// A decision as a cell: the kind, then the answer's name (the text up
    /// to its first colon).
    fn cell(decision: &Decision) -> String {
        let (kind, text) = match decision {
            Decision::CarryOut => return "carry-out".into(),
            Decision::StopJob => return "stop-job".into(),
            Decision::Refuse(CommandError::Busy(t)) => ("Busy", t),
            Decision::Refuse(CommandError::Refused(t)) => ("Refused", t),
            Decision::Refuse(CommandError::NoJob(t)) => ("NoJob", t),
            Decision::Refuse(CommandError::NotReady(t)) => ("NotReady", t),
            Decision::Refuse(CommandError::Failed(t)) => ("Failed", t),
        };
        format!("{kind} {}", text.split(':').next().unwrap_or_default())
    }

    /// Each command in each worker state. Columns: not ready, idle, then
    /// running and stopped for each view of `states()`.
    #[rustfmt::skip]
    const TABLE: &[(&str, [&str; 10])] = &[
        //                  not ready            idle         | running: before trial  in trial           past trial         resuming         | stopped: before trial  in trial        past trial       resuming
        ("install new",     ["NotReady not-ready", "carry-out", "Busy busy",          "Busy busy",         "Busy busy",        "Busy busy",        "carry-out",      "carry-out",     "carry-out",      "carry-out"]),
        ("install known",   ["NotReady not-ready", "carry-out", "Refused duplicate",  "Refused duplicate", "Refused duplicate", "Refused duplicate", "carry-out",     "carry-out",     "carry-out",      "carry-out"]),
        ("install garbage", ["NotReady not-ready", "carry-out", "Busy busy",          "Busy busy",         "Busy busy",        "Busy busy",        "carry-out",      "carry-out",     "carry-out",      "carry-out"]),
        ("mark good",       ["NotReady not-ready", "carry-out", "Busy busy",          "stop-job",          "Busy busy",        "Busy busy",        "NoJob moved-on", "carry-out",     "NoJob moved-on", "NoJob moved-on"]),
        ("mark bad",        ["NotReady not-ready", "carry-out", "Busy busy",          "stop-job",          "Busy busy",        "Busy busy",        "NoJob moved-on", "carry-out",     "NoJob moved-on", "NoJob moved-on"]),
        ("cancel",          ["NotReady not-ready", "carry-out", "stop-job",           "NoJob cancel-too-late", "NoJob cancel-too-late", "NoJob cancel-too-late", "carry-out", "NoJob moved-on", "NoJob moved-on", "NoJob moved-on"]),
    ];

    #[test]
    fn each_command_in_each_worker_state() {
        let states = states();
        let mut workers: Vec<(String, Worker<'_>)> =
            vec![("not ready".into(), Worker::NotReady), ("idle".into(), Worker::Idle)];
        workers.extend(states.iter().map(|(name, v)| (format!("running {name}"), Worker::Running(v))));
        workers.extend(states.iter().map(|(name, v)| (format!("stopped {name}"), Worker::Stopped(v))));
        let commands = commands();
        assert_eq!(TABLE.len(), commands.len());
        let mut wrong = Vec::new();
        for ((row, expected), (name, command)) in TABLE.iter().zip(&commands) {
            assert_eq!(row, name, "the table's rows are the commands, in order");
            assert_eq!(expected.len(), workers.len());
            for (want, (worker_name, worker)) in expected.iter().zip(&workers) {
                let got = cell(&decide(command, *worker));
                if got != *want {
                    wrong.push(format!("{name} while {worker_name}: {got}, expected {want}"));
                }
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    /// The texts say what to do next, and which job is in the way.
    #[test]
    fn the_answers_name_the_job_and_the_way_out() {
        let (_, before_trial) = &states()[0];
        let install = Command::Install { message: message("jti-new") };
        assert_eq!(
            decide(&install, Worker::Running(before_trial)),
            Decision::Refuse(CommandError::Busy("busy: update jti-run (v8) is in progress".into()))
        );
        let again = Command::Install { message: message("jti-old") };
        assert_eq!(
            decide(&again, Worker::Running(before_trial)),
            Decision::Refuse(CommandError::Refused(
                "duplicate: update jti-old was already handled; not run again".into()
            ))
        );
        let (_, in_trial) = &states()[1];
        let Decision::Refuse(CommandError::NoJob(why)) = decide(&Command::Cancel, Worker::Running(in_trial))
        else {
            panic!("a cancel in the trial is refused");
        };
        assert!(why.contains("MarkBad gives it up"), "{why}");
    }
}

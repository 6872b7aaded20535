//! The update worker: its own thread and runtime, so slot IO never stalls
//! the MQTT keep-alive. Idle, it admits update messages and carries D-Bus
//! calls out; while a job runs it answers what arrives at once, and stops
//! the job only for a call that acts on it (`bus::policy` decides which).

use crate::bus::model::Event as BusEvent;
use crate::bus::policy::{self, Decision, Worker};
use crate::bus::{Command, CommandError, Request};
use crate::logging::{self, Priority};
use crate::mqtt::{Inbound, Outbound, Progress};
use crate::sys::notify;
use crate::update::agent::BusyView;
use crate::update::{Admission, Executor, Refusal, Report, Reporter, Source};
use tokio::sync::{mpsc, watch};

/// The worker's ends of its channels.
pub(super) struct Channels {
    /// Update messages from the MQTT task.
    pub inbox: mpsc::Receiver<Inbound>,
    /// Calls from the D-Bus API.
    pub requests: mpsc::Receiver<Request>,
    pub outbox: mpsc::UnboundedSender<Outbound>,
    pub sink: crate::bus::Sink,
    pub shutdown: watch::Receiver<bool>,
}

/// What woke the idle worker.
enum Work {
    Message(Inbound),
    Call(Request),
}

/// Starts the worker's thread; its error is logged when it ends.
pub(super) fn spawn(
    executor: Executor,
    channels: Channels,
    connected: watch::Receiver<bool>,
) -> std::io::Result<std::thread::JoinHandle<std::io::Result<()>>> {
    std::thread::Builder::new().name("update-worker".into()).spawn(move || {
        let result = worker_main(executor, channels, connected);
        if let Err(e) = &result {
            logging::event(
                Priority::Error,
                &format!("fleetd: update worker: {e}"),
                &[(logging::ERROR, "worker")],
            );
        }
        result
    })
}

/// The worker's thread: runs the stored job, then waits for work until
/// shutdown or until the MQTT task is gone.
fn worker_main(
    mut executor: Executor,
    mut ch: Channels,
    connected: watch::Receiver<bool>,
) -> Result<(), std::io::Error> {
    executor.set_health_gate(connected);
    executor.on_report(reporter(ch.outbox.clone(), ch.sink.clone()));
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        if !run_job(&mut executor, &mut ch, Entry::Start).await {
            return;
        }
        executor.report_status();
        let mut calls_open = true;
        loop {
            let work = tokio::select! {
                message = ch.inbox.recv() => match message {
                    Some(m) => Work::Message(m),
                    None => break,
                },
                call = ch.requests.recv(), if calls_open => match call {
                    Some(c) => Work::Call(c),
                    None => {
                        calls_open = false;
                        continue;
                    }
                },
                _ = ch.shutdown.wait_for(|stop| *stop) => break,
            };
            let has_job = match work {
                Work::Message(message) => admit_message(&mut executor, message, &ch.outbox).await,
                Work::Call(request) => match policy::decide(&request.command, Worker::Idle) {
                    Decision::Refuse(e) => {
                        let _ = request.reply.send(Err(e));
                        false
                    }
                    Decision::CarryOut | Decision::StopJob => {
                        answer_call(&mut executor, request, &ch.sink).await
                    }
                },
            };
            if has_job && !run_job(&mut executor, &mut ch, Entry::Run).await {
                break;
            }
            executor.report_status();
        }
    });
    Ok(())
}

/// An update message to the idle worker: admitted (true: a job to run),
/// a second delivery, refused, or not saved (left unacknowledged).
async fn admit_message(
    executor: &mut Executor,
    message: Inbound,
    outbox: &mpsc::UnboundedSender<Outbound>,
) -> bool {
    let Inbound::UpdateMessage { topic, payload, token } = message;
    let ack = outbox.clone();
    let on_ack = move || {
        let _ = ack.send(Outbound::Ack(token));
    };
    let source = Source::Broker { topic: topic.clone() };
    match executor.admit(&payload, source, on_ack).await {
        Ok(Admission::Duplicate { jti }) => {
            report_duplicate(&jti, &topic, outbox);
            false
        }
        Ok(Admission::Refused(refusal)) => {
            send_refusal(&refusal, &topic, token, outbox);
            false
        }
        // A halt that stopped a job: its actions (giving the target up) run next.
        Ok(Admission::Accepted { .. } | Admission::Continued | Admission::Halted { .. }) => true,
        // Not saved, so not acknowledged: the MQTT task
        // hands the message over again later.
        Err(e) => {
            log_error(&format!("fleetd: {e}; the message stays unacknowledged"), e.name());
            let _ = outbox.send(Outbound::NotSaved { token });
            false
        }
    }
}

/// Each report of the executor, to the bus, to the MQTT task, and (a step)
/// to systemd's status line and the log.
fn reporter(reports: mpsc::UnboundedSender<Outbound>, sink: crate::bus::Sink) -> Reporter {
    Box::new(move |report: &Report| {
        crate::bus::send(&sink, BusEvent::Report(report.clone()));
        let outbound = match report {
            Report::Status(doc) => Outbound::Status(doc.clone()),
            Report::Progress { jti, version, done, total, fetched, reused } => {
                Outbound::Progress(Progress::Download {
                    jti: jti.clone(),
                    version: *version,
                    done: *done,
                    total: *total,
                    fetched: *fetched,
                    reused: *reused,
                })
            }
            Report::Step { state, detail, failure, job } => {
                notify::status(&format!("{state}: {detail}"));
                logging::step(*state, detail, failure.as_ref(), job.as_ref());
                Outbound::Progress(Progress::Step { state: *state, detail: detail.clone() })
            }
        };
        let _ = reports.send(outbound);
    })
}

/// How the executor is entered: the process's start (confirm the booted
/// slot, resume the stored job), an admitted job, or what is left of a job
/// after an interrupting call.
enum Entry {
    Start,
    Run,
    Resume,
}

/// Runs the job from `entry` while answering what arrives.
/// A call that must act on the job (a verdict in its trial, a cancel)
/// stops it at an await point, is carried out, and what is left of the
/// job resumes from its persisted state. `false` when shutdown came.
async fn run_job(executor: &mut Executor, ch: &mut Channels, mut entry: Entry) -> bool {
    loop {
        let busy = executor.busy_view();
        let ended = match std::mem::replace(&mut entry, Entry::Resume) {
            Entry::Start => while_busy(executor.start(), &busy, ch).await,
            Entry::Run => while_busy(executor.run(), &busy, ch).await,
            Entry::Resume => while_busy(executor.resume(), &busy, ch).await,
        };
        match ended {
            Ended::Shutdown => return false,
            Ended::Done(Err(e)) => {
                log_error(&format!("fleetd: {e}"), e.name());
                return true;
            }
            Ended::Done(Ok(())) => return true,
            Ended::Halt(message) => {
                executor.abandon_plan();
                let halted = admit_message(executor, message, &ch.outbox).await;
                // Halted: run what the halt left (giving the target up), to
                // the job's end. Otherwise the job goes on from what is persisted.
                entry = if halted && executor.state().active_job().is_none() {
                    Entry::Run
                } else {
                    Entry::Resume
                };
            }
            Ended::Interrupted(request) => {
                executor.abandon_plan();
                // The view the call was let in by is from the job's start:
                // a trial may have ended since (a rollback waiting on its
                // reboot). A verdict or cancel acts only on what still is.
                let now = executor.busy_view();
                match policy::decide(&request.command, Worker::Stopped(&now)) {
                    Decision::Refuse(e) => {
                        let _ = request.reply.send(Err(e));
                    }
                    // The job is stopped: the executor is free.
                    Decision::CarryOut | Decision::StopJob => {
                        answer_call(executor, request, &ch.sink).await;
                    }
                }
                // A verdict or a cancel ends the job; had it not, the rest
                // resumes from what is persisted, as after a restart.
                if executor.state().active_job().is_none() {
                    return true;
                }
            }
        }
    }
}

/// Carries out a D-Bus call on the free executor (the policy's
/// `CarryOut`); true when a job was admitted and is to run.
async fn answer_call(executor: &mut Executor, request: Request, sink: &crate::bus::Sink) -> bool {
    let (answer, has_job) = match request.command {
        Command::Install { message } => {
            let outcome = executor.admit(&message, Source::Local, || {}).await;
            let answer = match outcome {
                Ok(Admission::Accepted { jti, version }) => Ok(format!("accepted update {jti} v{version}")),
                Ok(Admission::Continued) => match executor.job() {
                    // Installed already, waiting for its reboot: that is
                    // this install's end, so it completes now.
                    Some(job) if matches!(job.phase, crate::update::Phase::RebootPending { .. }) => {
                        let done = format!(
                            "update {} v{} is installed and waits for a reboot",
                            job.name, job.version
                        );
                        crate::bus::send(
                            sink,
                            BusEvent::Completed(crate::bus::model::RESULT_OK, done.clone()),
                        );
                        Ok(done)
                    }
                    _ => Ok("the stored update goes on".to_string()),
                },
                Ok(Admission::Halted { jti }) => Ok(format!("update {jti} halted")),
                Ok(Admission::Duplicate { jti }) => Err(policy::duplicate(&jti)),
                Ok(Admission::Refused(refusal @ (Refusal::Busy { .. } | Refusal::Resuming))) => {
                    Err(CommandError::Busy(refusal.to_string()))
                }
                Ok(Admission::Refused(refusal)) => Err(CommandError::Refused(refusal.to_string())),
                Err(e) => Err(CommandError::Failed(e.to_string())),
            };
            let has_job = answer.is_ok();
            (answer, has_job)
        }
        Command::Mark { good } => {
            let answer = executor.mark_booted(good).await.map_err(|e| match e {
                crate::update::MarkError::UnfinishedTarget(_) => CommandError::Refused(e.to_string()),
                _ => CommandError::Failed(e.to_string()),
            });
            (answer, false)
        }
        Command::Cancel => {
            let answer = match executor.cancel().await {
                Ok(crate::update::Cancel::Done(done)) => Ok(done),
                Ok(crate::update::Cancel::Refused(why)) => Err(CommandError::NoJob(why)),
                Err(e) => Err(CommandError::Failed(e.to_string())),
            };
            (answer, false)
        }
    };
    let _ = request.reply.send(answer);
    has_job
}

enum Ended<T> {
    Done(T),
    Shutdown,
    /// A D-Bus call that needs the job stopped first.
    Interrupted(Request),
    /// A halt message: the job stops (at an await point) so that the
    /// executor can take it.
    Halt(Inbound),
}

/// Runs `work` (a job) to its end while answering every update message and
/// call that arrives meanwhile, so neither the MQTT task nor a bus client
/// waits on the worker. On shutdown `work` is dropped at an await point,
/// and the job stays at its last persisted checkpoint, to be resumed at
/// next start.
async fn while_busy<T>(
    work: impl std::future::Future<Output = T>,
    busy: &BusyView,
    ch: &mut Channels,
) -> Ended<T> {
    tokio::pin!(work);
    let (mut inbox_open, mut calls_open) = (true, true);
    loop {
        tokio::select! {
            done = &mut work => return Ended::Done(done),
            _ = ch.shutdown.wait_for(|stop| *stop) => return Ended::Shutdown,
            message = ch.inbox.recv(), if inbox_open => match message {
                Some(Inbound::UpdateMessage { topic, payload, token }) if crate::trust::halt::is_halt(&payload) => {
                    return Ended::Halt(Inbound::UpdateMessage { topic, payload, token });
                }
                Some(Inbound::UpdateMessage { topic, payload, token }) => match busy.answer(&payload) {
                    Ok(jti) => {
                        report_duplicate(&jti, &topic, &ch.outbox);
                        let _ = ch.outbox.send(Outbound::Ack(token));
                    }
                    Err(refusal) => send_refusal(&refusal, &topic, token, &ch.outbox),
                },
                None => inbox_open = false,
            },
            call = ch.requests.recv(), if calls_open => match call {
                Some(request) => match policy::decide(&request.command, Worker::Running(busy)) {
                    Decision::Refuse(e) => {
                        let _ = request.reply.send(Err(e));
                    }
                    // The executor is the job's: it stops first.
                    Decision::StopJob | Decision::CarryOut => return Ended::Interrupted(request),
                },
                None => calls_open = false,
            },
        }
    }
}

/// Logs a refusal and hands it to the MQTT task, which acks the message.
fn send_refusal(refusal: &Refusal, topic: &str, token: u64, outbox: &mpsc::UnboundedSender<Outbound>) {
    logging::event(
        Priority::Warning,
        &format!("update refused: {refusal} (on {topic})"),
        &[(logging::ERROR, refusal.name())],
    );
    let _ = outbox.send(Outbound::Refused { token, name: refusal.name(), error: refusal.to_string() });
}

fn report_duplicate(jti: &str, topic: &str, outbox: &mpsc::UnboundedSender<Outbound>) {
    logging::event(
        Priority::Info,
        &format!("update {jti} on {topic}: a second delivery of a message already handled; not run again"),
        &[(logging::JOB, jti)],
    );
    let _ = outbox.send(Outbound::Progress(Progress::Duplicate { jti: jti.to_string() }));
}

fn log_error(message: &str, name: &str) {
    logging::event(Priority::Error, message, &[(logging::ERROR, name)]);
}

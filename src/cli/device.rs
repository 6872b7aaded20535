//! `fleetd install | mark-good | mark-bad | status | run`.

use super::{runtime, CliError};
use crate::boot;
use crate::bus::client::{ClientError, Daemon, Message};
use crate::config::{self, Config};
use crate::update::StateStore as Store;
use crate::update::{Admission, Executor, Phase, Refusal, Report, Source};
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;

/// Every device command starts here, so logging starts here too (once).
fn load_config(flag: Option<&Path>) -> Result<Config, CliError> {
    let mut config = Config::load(&config::resolve_path(flag))?;
    crate::provision::store::apply_provisioned_groups(&mut config);
    crate::logging::init(config.log.level());
    Ok(config)
}

fn open_executor(config: Config) -> Result<Executor, CliError> {
    Ok(crate::update::open(config)?)
}

/// Prints reports: a redrawn progress bar on a terminal, plain lines otherwise.
fn reporter() -> crate::update::Reporter {
    let tty = std::io::stderr().is_terminal();
    let mut last_line_percent = u64::MAX;
    Box::new(move |report: &Report| match report {
        // Under systemd (a boot-time `fleetd run --once`, say) steps go to
        // the journal with their fields.
        Report::Step { state, detail, failure, job } if crate::logging::to_journal() => {
            crate::logging::step(*state, detail, failure.as_ref(), job.as_ref());
        }
        Report::Step { state, detail, .. } => {
            if tty {
                eprint!("\r\x1b[2K");
            }
            eprintln!("{state}: {detail}");
        }
        Report::Status(_) => {}
        Report::Progress { done, total, .. } => {
            let percent = done * 100 / (*total).max(1);
            if tty {
                let filled = (percent / 4) as usize;
                eprint!(
                    "\r[{}{}] {percent:>3}% {:.1}/{:.1} MiB",
                    "#".repeat(filled),
                    " ".repeat(25 - filled.min(25)),
                    *done as f64 / 1048576.0,
                    *total as f64 / 1048576.0
                );
                let _ = std::io::stderr().flush();
            } else if percent / 10 != last_line_percent / 10 || last_line_percent == u64::MAX {
                last_line_percent = percent;
                eprintln!("downloading: {percent}% ({done}/{total} bytes)");
            }
        }
    })
}

/// Exit code and summary line for where the job stands.
fn job_outcome(executor: &Executor) -> ExitCode {
    match executor.job().map(|j| &j.phase) {
        Some(Phase::Failed { error }) => {
            eprintln!("failed: {error}");
            ExitCode::from(1)
        }
        Some(Phase::RolledBack { reason }) => {
            eprintln!("rolled back: {reason}");
            ExitCode::from(1)
        }
        Some(Phase::Halted { by }) => {
            eprintln!("halted by {by}: the update stopped before its download finished");
            ExitCode::SUCCESS
        }
        _ => ExitCode::SUCCESS,
    }
}

/// Runs `call` against the running daemon of this device over D-Bus;
/// `None` when there is none (the command then works on the state itself).
fn via_daemon<T, F>(config: &Config, call: impl FnOnce(Daemon) -> F) -> Option<Result<T, CliError>>
where
    F: std::future::Future<Output = Result<T, ClientError>>,
{
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => return Some(Err(e)),
    };
    rt.block_on(async {
        match crate::bus::client::find(&config.device.id).await? {
            Ok(daemon) => Some(call(daemon).await.map_err(CliError::from)),
            Err(e) => Some(Err(e.into())),
        }
    })
}

pub fn install(config_flag: Option<&Path>, no_reboot: bool, file: &Path) -> ExitCode {
    let result = (|| -> Result<ExitCode, CliError> {
        let config = load_config(config_flag)?;
        let message = open_message(file)?;
        let message = match install_via_daemon(&config, no_reboot, message) {
            Ok(done) => return done,
            Err(no_daemon) => no_daemon,
        };
        let input = match message {
            Message::Bytes(bytes) => bytes,
            Message::File(file_handle) => {
                let mut bytes = Vec::new();
                std::io::Read::read_to_end(
                    &mut std::io::Read::take(&file_handle, crate::trust::MAX_MESSAGE_BYTES as u64 + 1),
                    &mut bytes,
                )
                .map_err(super::file_error(file))?;
                bytes
            }
        };
        let mut executor = open_executor(config)?;
        executor.no_reboot = no_reboot;
        executor.on_report(reporter());
        let rt = runtime()?;
        let admission = rt.block_on(executor.admit(&input, Source::Local, || {}))?;
        match admission {
            Admission::Refused(Refusal::Verify(e)) => {
                println!("rejected: {e}");
                return Ok(ExitCode::from(1));
            }
            Admission::Refused(refusal) => return Err(refusal.into()),
            // The same message again continues its job (after a crash or a cut).
            Admission::Continued => {
                if let Some(job) = executor.job() {
                    eprintln!("resuming update {} v{}", job.name, job.version);
                }
            }
            Admission::Accepted { .. } | Admission::Duplicate { .. } | Admission::Halted { .. } => {}
        }
        rt.block_on(executor.run())?;
        Ok(job_outcome(&executor))
    })();
    result.unwrap_or_else(|e| {
        eprintln!("fleetd install: {e}");
        ExitCode::from(1)
    })
}

/// The message to install: a regular file stays open (the daemon reads it
/// through the descriptor); stdin or a pipe is read here, capped.
fn open_message(file: &Path) -> Result<Message, CliError> {
    let limit = crate::trust::MAX_MESSAGE_BYTES + 1;
    if file == Path::new("-") {
        return Ok(Message::Bytes(crate::fsutil::read_prefix(file, limit).map_err(super::file_error(file))?));
    }
    let opened = std::fs::File::open(file).map_err(super::file_error(file))?;
    if opened.metadata().map_err(super::file_error(file))?.file_type().is_file() {
        return Ok(Message::File(opened));
    }
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut std::io::Read::take(opened, limit as u64), &mut bytes)
        .map_err(super::file_error(file))?;
    Ok(Message::Bytes(bytes))
}

/// A running daemon takes the job (it holds the state lock); this follows
/// its progress to `Completed`. `Err` gives the message back when no daemon
/// runs.
fn install_via_daemon(
    config: &Config,
    no_reboot: bool,
    message: Message,
) -> Result<Result<ExitCode, CliError>, Message> {
    let mut unsent = Some(message);
    let tty = std::io::stderr().is_terminal();
    let answer = via_daemon(config, |daemon| {
        let message = unsent.take();
        async move {
            // Taken once: the call is made at most once.
            let message = message.ok_or(ClientError::Gone)?;
            if no_reboot {
                return Err(ClientError::Refused(
                "no-reboot: the running daemon decides reboots ([update] reboot); stop it to use --no-reboot"
                    .into(),
            ));
            }
            eprintln!("the daemon takes the update (D-Bus)");
            let mut last = (-1, String::new());
            let (result, detail) = daemon
                .install(message, |percent, step| {
                    if (percent, step) == (last.0, last.1.as_str()) {
                        return;
                    }
                    if tty {
                        eprint!("\r\x1b[2K{percent:>3}% {step}");
                    } else if step != last.1 || percent / 10 != last.0 / 10 {
                        eprintln!("{percent:>3}% {step}");
                    }
                    last = (percent, step.to_string());
                })
                .await?;
            if tty {
                eprintln!();
            }
            Ok((result, detail))
        }
    });
    let Some(answer) = answer else {
        // No daemon: the call never ran, so the message comes back unsent.
        return match unsent {
            Some(message) => Err(message),
            None => Ok(Err(ClientError::Gone.into())),
        };
    };
    Ok(answer.map(|(result, detail)| {
        if result == crate::bus::model::RESULT_OK {
            eprintln!("done: {detail}");
            ExitCode::SUCCESS
        } else {
            eprintln!("failed: {detail}");
            ExitCode::from(1)
        }
    }))
}

pub fn mark(config_flag: Option<&Path>, good: bool) -> ExitCode {
    let result = (|| -> Result<ExitCode, CliError> {
        let config = load_config(config_flag)?;
        if let Some(answer) = via_daemon(&config, |daemon| async move { daemon.mark(good).await }) {
            println!("{}", answer?);
            return Ok(ExitCode::SUCCESS);
        }
        let mut executor = open_executor(config)?;
        executor.on_report(reporter());
        let answer = runtime()?.block_on(executor.mark_booted(good))?;
        println!("{answer}");
        Ok(ExitCode::SUCCESS)
    })();
    result.unwrap_or_else(|e| {
        eprintln!("fleetd mark-{}: {e}", if good { "good" } else { "bad" });
        ExitCode::from(1)
    })
}

pub fn status(config_flag: Option<&Path>, json: bool, pop: bool) -> ExitCode {
    let config = match load_config(config_flag) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("fleetd status: {e}");
            return ExitCode::from(2);
        }
    };
    let doc = match via_daemon(&config, |daemon| async move { Ok(daemon.found) }) {
        Some(Ok(mut doc)) => {
            doc.source = Some("daemon".into());
            // The renewal's state is the daemon's runtime file: fresher
            // than the document its worker last reported.
            crate::update::apply_identity(&mut doc, &config);
            Ok(doc)
        }
        Some(Err(e)) => {
            eprintln!("fleetd status: the daemon did not answer ({e}); showing the state on disk");
            status_from_disk(&config)
        }
        None => status_from_disk(&config),
    };
    let doc = match doc {
        Ok(mut doc) => {
            doc.source.get_or_insert_with(|| "disk".into());
            doc
        }
        Err(e) => {
            eprintln!("fleetd status: {e}");
            return ExitCode::from(1);
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
    } else {
        print!("{}", doc.to_human());
    }
    if pop {
        match crate::provision::store::load_or_create_pop(&config.pop_file()) {
            Ok(pop) => {
                // For the label: the access point and its passphrase (also as
                // the Wi-Fi QR code phones read), then the code, alone, last.
                if let Some(settings) = &config.provision {
                    let ssid = settings.ap_ssid(&config.device.id);
                    let passphrase = pop.ap_passphrase(&config.device.id);
                    println!("{:<12} {ssid}, passphrase {passphrase}", "access point");
                    println!("{:<12} WIFI:T:WPA;S:{};P:{passphrase};;", "wifi qr", wifi_qr_escape(&ssid));
                }
                println!("{}", pop.display_code())
            }
            Err(e) => {
                eprintln!("fleetd status: {e}");
                return ExitCode::from(1);
            }
        }
    }
    ExitCode::SUCCESS
}

/// What the state, the boot environment and the daemon's last connection
/// file say, when no daemon answers on the bus.
fn status_from_disk(config: &Config) -> Result<crate::status::StatusDoc, CliError> {
    let state = Store::read(&config.device.state_dir)?;
    let backend = boot::from_config(config);
    let booted = backend.as_ref().ok().and_then(|b| boot::booted_slot(config, b.as_ref()).ok());
    let mut doc = crate::update::status_doc(
        config,
        &state,
        backend.as_ref().ok().map(|b| b.as_ref()),
        booted.as_deref(),
    );
    if let Err(e) = &backend {
        doc.last_error.get_or_insert_with(|| format!("{}: {e}", e.name()));
    }
    doc.apply_provisioning(&crate::provision::phase::facts(config));
    doc.mqtt = crate::mqtt::read_connection_file(&config.device.state_dir);
    Ok(doc)
}

/// `fleetd factory-row`: `serial,project,hardware,groups,pop_key`, where
/// pop_key is the enrollment key derived from the PoP (it opens neither
/// the access point nor the portal).
pub fn factory_row(config_flag: Option<&Path>, groups: Option<&str>) -> ExitCode {
    let config = match load_config(config_flag) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("fleetd factory-row: {e}");
            return ExitCode::from(2);
        }
    };
    let groups: Vec<String> = match groups {
        Some(text) => text.split(';').map(str::trim).filter(|g| !g.is_empty()).map(str::to_string).collect(),
        None => config.device.groups.clone(),
    };
    if let Some(bad) = groups.iter().find(|g| !crate::device_id::is_identifier(g)) {
        eprintln!("fleetd factory-row: --groups: {bad:?} must be 1-64 characters of [A-Za-z0-9._-]");
        return ExitCode::from(2);
    }
    let pop = match crate::provision::store::load_or_create_pop(&config.pop_file()) {
        Ok(pop) => pop,
        Err(e) => {
            eprintln!("fleetd factory-row: {e}");
            return ExitCode::from(1);
        }
    };
    let key = crate::provision::enroll::EnrollmentKey::derive(&pop, &config.device.id);
    let row = [
        config.device.id.as_str(),
        config.device.project.as_str(),
        config.device.hardware.as_str(),
        &groups.join(";"),
        &key.to_text(),
    ]
    .map(csv_field)
    .join(",");
    println!("{row}");
    ExitCode::SUCCESS
}

/// RFC 4180: a field with a comma, quote or line break is quoted, its
/// quotes doubled.
fn csv_field(field: &str) -> String {
    if field.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", field.replace('"', "\"\""))
    } else {
        field.to_string()
    }
}

/// The Wi-Fi QR format escapes `\ ; , : "` with a backslash.
fn wifi_qr_escape(text: &str) -> String {
    text.chars().flat_map(|c| if "\\;,:\"".contains(c) { vec!['\\', c] } else { vec![c] }).collect()
}

/// `fleetd reset --factory`. It takes the state lock, so it never races a
/// running daemon (stop it first; it provisions again at its next start).
pub fn reset_factory(config_flag: Option<&Path>) -> ExitCode {
    let result = (|| -> Result<bool, CliError> {
        let config = load_config(config_flag)?;
        let (_lock, _state) = Store::open(&config.device.state_dir)?;
        let store = crate::provision::store::ProvisionStore::new(&config.device.state_dir);
        let ssid = store.load().ok().flatten().and_then(|r| r.wifi_ssid);
        let had = store.forget().map_err(|e| CliError::Usage(e.to_string()))?;
        let status = config.device.state_dir.join(crate::provision::phase::STATUS_FILE);
        let _ = std::fs::remove_file(status);
        if let Some(settings) = &config.provision {
            let client_dir = crate::net::client_dir(&config.device.state_dir);
            runtime()?
                .block_on(crate::net::forget_wifi(settings, ssid.as_deref(), &client_dir))
                .map_err(|e| CliError::Usage(e.to_string()))?;
        }
        Ok(had)
    })();
    match result {
        Ok(had) => {
            println!(
                "{}; the portal opens at the next start of fleetd",
                if had { "provisioning forgotten" } else { "nothing was provisioned" }
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("fleetd reset: {e}");
            ExitCode::from(1)
        }
    }
}

pub fn run(config_flag: Option<&Path>, once: bool) -> ExitCode {
    let result = (|| -> Result<ExitCode, CliError> {
        let config = load_config(config_flag)?;
        if !once && (config.mqtt.is_some() || config.provision.is_some()) {
            crate::daemon::run(config, |config| {
                let mut executor = crate::update::open(config)?;
                executor.on_report(reporter());
                Ok(executor)
            })?;
            return Ok(ExitCode::SUCCESS);
        }
        let mut executor = open_executor(config)?;
        executor.on_report(reporter());
        let rt = runtime()?;
        if once {
            rt.block_on(executor.start())?;
            // The job's outcome is in the status; reconciling itself succeeded.
            let _ = job_outcome(&executor);
            return Ok(ExitCode::SUCCESS);
        }
        // SIGTERM ends a download at its next await point; the job resumes
        // from its last checkpoint at the next start.
        rt.block_on(async {
            let stop = crate::sys::signals::shutdown();
            tokio::pin!(stop);
            // Nothing to connect to, but systemd still waits for this.
            crate::sys::notify::send("READY=1");
            crate::sys::notify::status("no broker configured: finishing the stored job, then idle");
            tokio::spawn(crate::sys::notify::feed_watchdog());
            tokio::select! {
                started = executor.start() => started?,
                _ = &mut stop => return Ok(()),
            }
            stop.await;
            Ok::<(), CliError>(())
        })?;
        Ok(ExitCode::SUCCESS)
    })();
    result.unwrap_or_else(|e| {
        eprintln!("fleetd run: {e}");
        ExitCode::from(1)
    })
}

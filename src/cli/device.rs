//! `fleetd install | mark-good | mark-bad | status | run`.

use crate::boot;
use crate::config::{self, Config};
use crate::update::StateStore as Store;
use crate::update::{Phase, Report, Updater};
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;

fn load_config(flag: Option<&Path>) -> Result<Config, String> {
    Config::load(&config::resolve_path(flag)).map_err(|e| e.to_string())
}

pub(super) fn open_updater(config: Config) -> Result<Updater, String> {
    let store = Store::open(&config.device.state_dir).map_err(|e| e.to_string())?;
    let backend = boot::from_config(&config).map_err(|e| e.to_string())?;
    let booted = boot::booted_slot(&config, backend.as_ref()).map_err(|e| e.to_string())?;
    let boot_id = boot::boot_id(&config).map_err(|e| e.to_string())?;
    Ok(Updater::new(config, store, backend, booted, boot_id))
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())
}

/// Prints reports: a redrawn progress bar on a terminal, plain lines otherwise.
fn reporter() -> crate::update::driver::Reporter {
    let tty = std::io::stderr().is_terminal();
    let mut last_line_percent = u64::MAX;
    Box::new(move |report: &Report| match report {
        Report::Step { state, detail } => {
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
fn job_outcome(updater: &Updater) -> ExitCode {
    match updater.job().map(|j| &j.phase) {
        Some(Phase::Failed { error }) => {
            eprintln!("failed: {error}");
            ExitCode::from(1)
        }
        Some(Phase::RolledBack { reason }) => {
            eprintln!("rolled back: {reason}");
            ExitCode::from(1)
        }
        _ => ExitCode::SUCCESS,
    }
}

pub fn install(config_flag: Option<&Path>, no_reboot: bool, file: &Path) -> ExitCode {
    let result = (|| -> Result<ExitCode, String> {
        let mut updater = open_updater(load_config(config_flag)?)?;
        updater.no_reboot = no_reboot;
        updater.on_report(reporter());
        let rt = runtime()?;
        // The same message again continues its job (after a crash or a cut).
        let input = crate::fsutil::read_prefix(file, crate::trust::MAX_MESSAGE_BYTES + 1)
            .map_err(|e| format!("{}: {e}", file.display()))?;
        if let Some(job) = updater.store().state().active_job() {
            if crate::trust::peek_jti(&input).as_deref() == Some(job.jti.as_str()) {
                eprintln!("resuming update {} v{}", job.name, job.version);
                rt.block_on(updater.resume()).map_err(|e| e.to_string())?;
                return Ok(job_outcome(&updater));
            }
        }
        // Verify with what the updater already loaded: the same config, keys
        // and state, and the bytes read above.
        let policy = updater.config().policy().map_err(|e| e.to_string())?;
        let verdict = policy.verify(&input, &updater.store().state().trust_state(), crate::system_now());
        let claims = match verdict {
            Ok(verified) => verified.claims,
            Err(e) => {
                let store = updater.store_mut();
                store.state_mut().last_error = Some(e.to_string());
                store.save().map_err(|e| e.to_string())?;
                println!("rejected: {e}");
                return Ok(ExitCode::from(1));
            }
        };
        if let Err(e) = rt.block_on(updater.start(&claims)) {
            let store = updater.store_mut();
            store.state_mut().last_error = Some(e.to_string());
            let _ = store.save();
            return Err(e.to_string());
        }
        Ok(job_outcome(&updater))
    })();
    result.unwrap_or_else(|e| {
        eprintln!("fleetd install: {e}");
        ExitCode::from(1)
    })
}

pub fn mark(config_flag: Option<&Path>, good: bool) -> ExitCode {
    let result = (|| -> Result<ExitCode, String> {
        let mut updater = open_updater(load_config(config_flag)?)?;
        updater.on_report(reporter());
        let booted = updater.booted().to_string();
        if good && updater.booted_is_unfinished_target() {
            return Err(format!(
                "target-is-booted: slot {booted} holds an unfinished download; refusing to mark it good"
            ));
        }
        // In a trial (also right after a manual reboot, before any health
        // check ran) the job ends exactly as the daemon's check ends it.
        let ended_trial = runtime()?.block_on(updater.verdict_by_hand(good)).map_err(|e| e.to_string())?;
        if !ended_trial {
            let backend = updater.boot_mut();
            let result = if good { backend.mark_good(&booted) } else { backend.mark_bad(&booted) };
            result.map_err(|e| e.to_string())?;
        }
        println!("slot {booted} marked {}", if good { "good" } else { "bad" });
        Ok(ExitCode::SUCCESS)
    })();
    result.unwrap_or_else(|e| {
        eprintln!("fleetd mark-{}: {e}", if good { "good" } else { "bad" });
        ExitCode::from(1)
    })
}

pub fn status(config_flag: Option<&Path>, json: bool) -> ExitCode {
    let config = match load_config(config_flag) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("fleetd status: {e}");
            return ExitCode::from(2);
        }
    };
    let state = match Store::read(&config.device.state_dir) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("fleetd status: {e}");
            return ExitCode::from(1);
        }
    };
    let backend = boot::from_config(&config);
    let booted = backend.as_ref().ok().and_then(|b| boot::booted_slot(&config, b.as_ref()).ok());
    let mut doc = crate::update::status_doc(
        &config,
        &state,
        backend.as_ref().ok().map(|b| b.as_ref()),
        booted.as_deref(),
    );
    if let Err(e) = &backend {
        doc.last_error.get_or_insert_with(|| format!("{}: {e}", e.name()));
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
    } else {
        print!("{}", doc.to_human());
    }
    ExitCode::SUCCESS
}

pub fn run(config_flag: Option<&Path>, once: bool) -> ExitCode {
    let result = (|| -> Result<ExitCode, String> {
        let config = load_config(config_flag)?;
        if !once && config.mqtt.is_some() {
            crate::daemon::run(config, |config| {
                let mut updater = open_updater(config)?;
                updater.on_report(reporter());
                Ok(updater)
            })?;
            return Ok(ExitCode::SUCCESS);
        }
        let mut updater = open_updater(config)?;
        updater.on_report(reporter());
        let rt = runtime()?;
        if once {
            rt.block_on(updater.resume()).map_err(|e| e.to_string())?;
            // The job's outcome is in the status; reconciling itself succeeded.
            let _ = job_outcome(&updater);
            return Ok(ExitCode::SUCCESS);
        }
        // SIGTERM ends a download at its next await point; the job resumes
        // from its last checkpoint at the next start.
        rt.block_on(async {
            let stop = crate::sys::signals::shutdown();
            tokio::pin!(stop);
            tokio::select! {
                resumed = updater.resume() => resumed.map_err(|e| e.to_string())?,
                _ = &mut stop => return Ok(()),
            }
            stop.await;
            Ok::<(), String>(())
        })?;
        Ok(ExitCode::SUCCESS)
    })();
    result.unwrap_or_else(|e| {
        eprintln!("fleetd run: {e}");
        ExitCode::from(1)
    })
}

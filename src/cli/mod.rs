//! Command-line front ends. `fleetd` (device side) lives here; `fleetctl`
//! (fleet side) in `fleetctl.rs`; the guided demo in `demo.rs`.

#[cfg(feature = "fleet")]
mod demo;
mod device;
#[cfg(feature = "fleet")]
pub mod fleetctl;

use crate::config::{self, Config};
use crate::trust::{self, VerifyError};
use crate::update::StateStore as Store;
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "fleetd", version, about = "Gateway update and provisioning daemon")]
struct FleetdCli {
    #[command(subcommand)]
    command: FleetdCommand,
}

#[derive(Subcommand)]
enum FleetdCommand {
    /// Check a co-signed update message against the trust policy and stored state (read-only).
    Verify {
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print a JSON object instead of one line.
        #[arg(long)]
        json: bool,
        /// The message file, or `-` for standard input.
        file: PathBuf,
    },
    /// Verify a message and install its image into the inactive slot, then switch to it (like `rauc install`).
    Install {
        #[arg(long)]
        config: Option<PathBuf>,
        /// Stop at reboot-pending instead of rebooting.
        #[arg(long)]
        no_reboot: bool,
        /// The message file, or `-` for standard input.
        file: PathBuf,
    },
    /// Commit the booted slot (ends a trial as healthy).
    MarkGood {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Give the booted slot up (ends a trial as failed; the next boot runs the other slot).
    MarkBad {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Provisioning, slots, the current job and the last error.
    Status {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// The daemon: finish or resume any pending update, then serve.
    Run {
        #[arg(long)]
        config: Option<PathBuf>,
        /// Reconcile (resume a download, check a trial boot, commit or roll back) and exit.
        #[arg(long)]
        once: bool,
    },
    /// Show the whole flow on this machine with embedded defaults: no root, no setup.
    #[cfg(feature = "fleet")]
    Demo,
}

pub fn fleetd_main() -> ExitCode {
    let cli = FleetdCli::parse();
    match cli.command {
        FleetdCommand::Verify { config, json, file } => verify_command(config.as_deref(), json, &file),
        FleetdCommand::Install { config, no_reboot, file } => {
            device::install(config.as_deref(), no_reboot, &file)
        }
        FleetdCommand::MarkGood { config } => device::mark(config.as_deref(), true),
        FleetdCommand::MarkBad { config } => device::mark(config.as_deref(), false),
        FleetdCommand::Status { config, json } => device::status(config.as_deref(), json),
        FleetdCommand::Run { config, once } => device::run(config.as_deref(), once),
        #[cfg(feature = "fleet")]
        FleetdCommand::Demo => demo::run(),
    }
}

/// The outcome of `fleetd verify`, for printing.
enum VerifyOutcome {
    Accepted(trust::Claims),
    Rejected(VerifyError),
}

fn verify_command(config: Option<&Path>, json: bool, file: &Path) -> ExitCode {
    let path = config::resolve_path(config);
    let outcome = match verify_file(&path, file) {
        Ok(outcome) => outcome,
        Err(message) => {
            eprintln!("fleetd verify: {message}");
            return ExitCode::from(2);
        }
    };
    match (&outcome, json) {
        (VerifyOutcome::Accepted(c), false) => println!("accepted: {} v{}", c.name, c.version),
        (VerifyOutcome::Rejected(e), false) => println!("rejected: {e}"),
        (VerifyOutcome::Accepted(c), true) => println!(
            "{}",
            serde_json::json!({"accepted": true, "name": c.name, "version": c.version, "jti": c.jti,
                "image": c.image})
        ),
        (VerifyOutcome::Rejected(e), true) => {
            let detail = e.to_string();
            let detail = detail.split_once(": ").map(|(_, d)| d).unwrap_or(&detail);
            println!("{}", serde_json::json!({"accepted": false, "error": e.name(), "detail": detail}))
        }
    }
    match outcome {
        VerifyOutcome::Accepted(_) => ExitCode::SUCCESS,
        VerifyOutcome::Rejected(_) => ExitCode::from(1),
    }
}

/// Loads config, keys and state, then verifies. `Err` is a usage or config problem (exit 2).
fn verify_file(config_path: &Path, file: &Path) -> Result<VerifyOutcome, String> {
    let config = Config::load(config_path).map_err(|e| e.to_string())?;
    let policy = config.policy().map_err(|e| e.to_string())?;
    let state = Store::read(&config.device.state_dir).map_err(|e| e.to_string())?;
    // One byte past the cap is enough to know the message is too large.
    let input = crate::fsutil::read_prefix(file, trust::MAX_MESSAGE_BYTES + 1)
        .map_err(|e| format!("{}: {e}", file.display()))?;
    Ok(match policy.verify(&input, &state.trust_state(), crate::system_now()) {
        Ok(verified) => VerifyOutcome::Accepted(verified.claims),
        Err(e) => VerifyOutcome::Rejected(e),
    })
}

//! `fleetd`'s command line (the device side). `fleetctl` and the guided
//! demo are the fleet side's (crates/fleetctl); `fleetd demo` runs it.

// A command's error is built once, at its end, and printed: its size costs nothing.
#![allow(clippy::result_large_err)]

mod device;

use crate::config::{self, Config};
use crate::trust::{self, VerifyError};
use crate::update::StateStore as Store;
use clap::{Parser, Subcommand};

/// Why a command failed: each variant names its cause, and the front end
/// prints it as it is (`<error-name>: <detail>` for the typed ones).
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A file the command needs could not be read or written.
    #[error("{path}: {source}")]
    File { path: PathBuf, source: std::io::Error },
    /// A flag is missing or does not fit the others.
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Open(#[from] crate::update::OpenError),
    #[error(transparent)]
    Mark(#[from] crate::update::MarkError),
    /// The running daemon refused or failed a call over D-Bus.
    #[error(transparent)]
    Bus(#[from] crate::bus::client::ClientError),
    #[error(transparent)]
    Exec(#[from] crate::update::ExecError),
    #[error(transparent)]
    Daemon(#[from] crate::daemon::DaemonError),
    #[error(transparent)]
    Refused(#[from] crate::update::Refusal),
    #[error(transparent)]
    Boot(#[from] crate::boot::BootError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Http(#[from] crate::http::HttpError),
    #[error(transparent)]
    Mqtt(#[from] crate::mqtt::MqttError),
    #[error("runtime: {0}")]
    Runtime(std::io::Error),
}

/// `.map_err(file_error(path))`: an IO error about `path`.
pub(crate) fn file_error(path: &Path) -> impl FnOnce(std::io::Error) -> CliError + '_ {
    move |source| CliError::File { path: path.to_path_buf(), source }
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(CliError::Runtime)
}
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// `fleetd`'s command line, for man pages and shell completions.
pub fn fleetd_command() -> clap::Command {
    <FleetdCli as clap::CommandFactory>::command()
}

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
        /// Also print the proof-of-possession code (made now if there is
        /// none yet), alone on the last line: for the label or QR code.
        #[arg(long)]
        pop: bool,
    },
    /// `--factory`: forget the provisioning (identity, Wi-Fi profile, broker
    /// settings) and unlock the portal; slots, installed version and replay
    /// cache stay. Stop the daemon first.
    Reset {
        #[arg(long)]
        config: Option<PathBuf>,
        /// Required: says what is forgotten.
        #[arg(long, required = true)]
        factory: bool,
    },
    /// The device's row for the registrar's import: one CSV line without
    /// header, `serial,project,hardware,groups,pop_key` (the PoP is made
    /// now if there is none yet, as `fleetd run` does).
    FactoryRow {
        #[arg(long)]
        config: Option<PathBuf>,
        /// `;`-separated; default: the config's `[device] groups`.
        #[arg(long)]
        groups: Option<String>,
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
    /// Runs `fleetctl demo` (the fleet side), found next to this binary or on PATH.
    Demo,
}

pub fn fleetd_main() -> ExitCode {
    let cli = FleetdCli::parse();
    if matches!(
        cli.command,
        FleetdCommand::Status { .. } | FleetdCommand::Verify { .. } | FleetdCommand::FactoryRow { .. }
    ) {
        crate::sys::signals::end_quietly_on_closed_stdout();
    }
    match cli.command {
        FleetdCommand::Verify { config, json, file } => verify_command(config.as_deref(), json, &file),
        FleetdCommand::Install { config, no_reboot, file } => {
            device::install(config.as_deref(), no_reboot, &file)
        }
        FleetdCommand::MarkGood { config } => device::mark(config.as_deref(), true),
        FleetdCommand::MarkBad { config } => device::mark(config.as_deref(), false),
        FleetdCommand::Status { config, json, pop } => device::status(config.as_deref(), json, pop),
        FleetdCommand::Reset { config, factory: _ } => device::reset_factory(config.as_deref()),
        FleetdCommand::FactoryRow { config, groups } => {
            device::factory_row(config.as_deref(), groups.as_deref())
        }
        FleetdCommand::Run { config, once } => device::run(config.as_deref(), once),
        FleetdCommand::Demo => demo_command(),
    }
}

/// The demo runs the fleet side, which the device binary does not carry:
/// like `git foo` running `git-foo`, `fleetd demo` runs `fleetctl demo`.
fn demo_command() -> ExitCode {
    use std::os::unix::process::CommandExt;
    let beside = std::env::current_exe().ok().and_then(|exe| Some(exe.parent()?.join("fleetctl")));
    let fleetctl = beside.filter(|path| path.is_file()).unwrap_or_else(|| PathBuf::from("fleetctl"));
    let error = std::process::Command::new(&fleetctl).arg("demo").exec();
    eprintln!(
        "fleetd demo: cannot run {} ({error}): the demo needs fleetctl, the fleet side; \
         `cargo build --release` at the project's root builds both",
        fleetctl.display()
    );
    ExitCode::from(2)
}

/// The outcome of `fleetd verify`, for printing.
enum VerifyOutcome {
    Accepted(Box<trust::Claims>),
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
fn verify_file(config_path: &Path, file: &Path) -> Result<VerifyOutcome, CliError> {
    let mut config = Config::load(config_path)?;
    crate::provision::store::apply_provisioned_groups(&mut config);
    let policy = crate::policy::load(&config)?;
    let state = Store::read(&config.device.state_dir)?;
    // One byte past the cap is enough to know the message is too large.
    let input = crate::fsutil::read_prefix(file, trust::MAX_MESSAGE_BYTES + 1).map_err(file_error(file))?;
    Ok(match policy.verify(&input, &state.trust_state(), crate::system_now()) {
        Ok(verified) => VerifyOutcome::Accepted(Box::new(verified.claims)),
        Err(e) => VerifyOutcome::Rejected(e),
    })
}

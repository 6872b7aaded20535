//! `fleetctl rollout start|watch|halt`: the command line over `rollout`,
//! and the halt's signatures (this server, the co-signer, the fleet key).

use super::{add_signature, load_signing_key, read_envelope, request_cosignature, runtime, CliError};
use crate::rollout::{self, FleetConfig, HaltDraft, RolloutError, Thresholds, WatchEnd};
use clap::Subcommand;
use fleetd::mqtt::Topics;
use fleetd::trust::halt::HaltClaims;
use fleetd::trust::Envelope;
use fleetd_registrar::rollouts::Halt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

#[derive(Subcommand)]
pub enum RolloutCommand {
    /// Publish a message with a `rollout` claim to a group's update topic (retained).
    Start {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        group: String,
        /// The co-signed message (`fleetctl sign --wave ...`, co-signed).
        message: PathBuf,
    },
    /// Follow the devices' status, counted per wave; publish the halt and
    /// exit 1 when failures cross the threshold; exit 0 when every targeted
    /// device has ended.
    Watch {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        jti: String,
        /// Halt when more than this percentage of the devices that finished
        /// failed or rolled back.
        #[arg(long, default_value_t = 10.0)]
        max_failures: f64,
        /// Decide only once at least this many devices finished.
        #[arg(long, default_value_t = 1)]
        min_devices: usize,
        /// Stop watching after this many seconds (exit 3).
        #[arg(long)]
        timeout: Option<u64>,
    },
    /// Sign (this server, the co-signer, the fleet key) and publish the
    /// halt, retained: devices that have not finished downloading drop the
    /// update.
    Halt {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        jti: String,
        /// Recorded with the halt.
        #[arg(long, default_value = "halted by hand")]
        reason: String,
    },
}

/// The halt's claims, signed by this server, the co-signer and the fleet key.
async fn sign_halt(config: &FleetConfig, claims: &HaltClaims) -> Result<String, CliError> {
    let s = &config.signing;
    let mut envelope = Envelope::new(&claims.to_json());
    let server_kid = format!("{}{}", crate::cosigner::SERVER_KID_PREFIX, s.server);
    add_signature(&mut envelope, &load_signing_key(&s.server_key)?, &server_kid)?;
    let mut cosigned = request_cosignature(&s.cosigner_url, &envelope, s.cosigner_ca.as_deref()).await?;
    add_signature(&mut cosigned, &load_signing_key(&s.fleet_key)?, &s.fleet_kid)?;
    Ok(cosigned.to_json())
}

/// Signs a halt unless one is recorded, records it, publishes it.
async fn halt(config: &FleetConfig, jti: &str, reason: &str) -> Result<Halt, CliError> {
    let db = rollout::open_db(config).await?;
    let (stored, draft) = rollout::draft_halt(&db, jti, config.signing.halt_valid_for_s).await?;
    let halt = match draft {
        HaltDraft::Recorded(halt) => halt,
        HaltDraft::Unsigned(claims) => Halt {
            message: sign_halt(config, &claims).await?,
            at: fleetd_registrar::db::now(),
            reason: reason.to_string(),
        },
    };
    Ok(rollout::publish_halt(config, &db, &stored, halt).await?)
}

fn load(path: &Path) -> Result<FleetConfig, CliError> {
    FleetConfig::load(path).map_err(CliError::FleetConfig)
}

/// 0 done, 1 refused, failed or halted, 3 `watch` timed out.
pub fn command(cmd: RolloutCommand) -> ExitCode {
    let fail = |e: CliError| {
        eprintln!("fleetctl: {e}");
        ExitCode::from(1)
    };
    let runtime = match runtime() {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    match cmd {
        RolloutCommand::Start { config: path, group, message } => {
            let started = load(&path).and_then(|config| {
                let envelope = read_envelope(&message)?;
                let r = runtime.block_on(rollout::start(&config, &group, &envelope))?;
                Ok((config, r))
            });
            match started {
                Ok((config, r)) => {
                    println!(
                        "published rollout {} (version {}) to {}, retained",
                        r.jti,
                        r.version,
                        Topics::update_for_group(&config.project, &r.group)
                    );
                    println!(
                        "follow it with: fleetctl rollout watch --config {} --jti {}",
                        path.display(),
                        r.jti
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
        RolloutCommand::Halt { config, jti, reason } => {
            match load(&config).and_then(|c| runtime.block_on(halt(&c, &jti, &reason))) {
                Ok(h) => {
                    println!(
                        "halted rollout {jti} at {} ({}); the halt is published, retained",
                        h.at, h.reason
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
        RolloutCommand::Watch { config, jti, max_failures, min_devices, timeout } => {
            let thresholds = Thresholds { max_failures_percent: max_failures, min_devices };
            let ended = load(&config).and_then(|c| {
                runtime.block_on(async {
                    let end =
                        rollout::watch(&c, &jti, thresholds, timeout.map(Duration::from_secs), |text| {
                            println!("{text}")
                        })
                        .await?;
                    if let WatchEnd::FailuresCrossed { reason } = &end {
                        halt(&c, &jti, reason).await?;
                    }
                    Ok::<_, CliError>(end)
                })
            });
            match ended {
                Ok(WatchEnd::Done) => {
                    println!("rollout {jti}: every targeted device ended");
                    ExitCode::SUCCESS
                }
                Ok(WatchEnd::FailuresCrossed { reason }) => {
                    println!("rollout {jti}: halted: {reason}");
                    ExitCode::from(1)
                }
                Ok(WatchEnd::HaltedBefore { reason }) => {
                    println!("rollout {jti}: {reason}");
                    ExitCode::from(1)
                }
                Ok(WatchEnd::TimedOut) => {
                    println!("rollout {jti}: still running when --timeout passed");
                    ExitCode::from(3)
                }
                Err(e) => fail(e),
            }
        }
    }
}

impl From<RolloutError> for CliError {
    fn from(e: RolloutError) -> Self {
        CliError::Rollout(Box::new(e))
    }
}

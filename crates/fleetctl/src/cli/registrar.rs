//! `fleetctl registrar ...`: the registrar service and its administration.
//! The administrative commands talk to the registrar's database directly,
//! with the same config file as `serve`.

use clap::Subcommand;
use fleetd_registrar::import::Outcome;
use fleetd_registrar::names::Role;
use fleetd_registrar::{audit, crl, db, devices, import, users, Config, Db, Issuer, RegistrarError};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum RegistrarCommand {
    /// Run the registrar (HTTP API and installer page).
    Serve {
        #[arg(long)]
        config: PathBuf,
    },
    /// Installers and admins.
    #[command(subcommand)]
    User(UserCommand),
    /// Import the registry's CSV (serial,project,hardware,groups,pop_key):
    /// one line per row, `LINE SERIAL created|unchanged|conflict|invalid: reason`.
    Import {
        #[arg(long)]
        config: PathBuf,
        /// Check and report, write nothing.
        #[arg(long)]
        dry_run: bool,
        file: PathBuf,
    },
    /// Revoke every certificate of a device (it may enroll again with a claim).
    Revoke {
        #[arg(long)]
        config: PathBuf,
        /// keyCompromise or unspecified.
        #[arg(long, default_value = "keyCompromise", value_parser = ["keyCompromise", "unspecified"])]
        reason: String,
        serial: String,
    },
    /// Revoke every certificate of a device and refuse it from then on.
    Retire {
        #[arg(long)]
        config: PathBuf,
        serial: String,
    },
    /// Print the audit trail; --verify checks its hash chain (exit 1 when a row was changed).
    Audit {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        verify: bool,
    },
}

#[derive(Subcommand)]
pub enum UserCommand {
    /// Add a user; the password is the first line of standard input (at least 8 characters).
    Add {
        #[arg(long)]
        config: PathBuf,
        #[arg(long, value_parser = ["admin", "installer"])]
        role: String,
        name: String,
    },
}

/// 0 done, 1 refused or failed (the named reason printed), 2 usage.
pub fn command(cmd: RegistrarCommand) -> ExitCode {
    let result = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt.block_on(run(cmd)),
        Err(e) => Err(RegistrarError::Internal(format!("runtime: {e}"))),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("fleetctl registrar: {e}");
            ExitCode::from(1)
        }
    }
}

async fn run(cmd: RegistrarCommand) -> Result<ExitCode, RegistrarError> {
    match cmd {
        RegistrarCommand::Serve { config } => {
            let config = Config::load(&config)?;
            fleetd_registrar::run(config, fleetd::sys::signals::shutdown()).await?;
            Ok(ExitCode::SUCCESS)
        }
        RegistrarCommand::User(UserCommand::Add { config, role, name }) => {
            let role = Role::parse(&role)?;
            fleetd_registrar::names::check_user(&name)?;
            let password = read_password_line()?;
            let db = connect(&config).await?.1;
            users::add_user(&db, &name, role, &password, db::now()).await?;
            println!("added user {name} ({})", role.as_str());
            Ok(ExitCode::SUCCESS)
        }
        RegistrarCommand::Import { config, dry_run, file } => {
            let text = std::fs::read_to_string(&file)
                .map_err(|source| RegistrarError::File { path: file.clone(), source })?;
            let rows = import::parse_csv(&text)?;
            let db = connect(&config).await?.1;
            let results = import::apply(&db, "cli", &rows, dry_run, db::now()).await?;
            for result in &results {
                println!("{result}");
            }
            let count = |o: Outcome| results.iter().filter(|r| r.outcome == o).count();
            eprintln!(
                "{} rows: {} created, {} unchanged, {} conflict, {} invalid{}",
                results.len(),
                count(Outcome::Created),
                count(Outcome::Unchanged),
                count(Outcome::Conflict),
                count(Outcome::Invalid),
                if dry_run { " (dry run: nothing written)" } else { "" }
            );
            Ok(if count(Outcome::Invalid) == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        RegistrarCommand::Revoke { config, reason, serial } => {
            let (config, db) = connect(&config).await?;
            let issuer = Issuer::load(&config.ca.cert, &config.ca.key)?;
            let n = devices::revoke(&db, "cli", &serial, false, &reason, db::now()).await?;
            new_crl(&config, &db, &issuer).await?;
            println!("revoked {n} certificate(s) of {serial} ({reason})");
            Ok(ExitCode::SUCCESS)
        }
        RegistrarCommand::Retire { config, serial } => {
            let (config, db) = connect(&config).await?;
            let issuer = Issuer::load(&config.ca.cert, &config.ca.key)?;
            let n = devices::revoke(&db, "cli", &serial, true, "cessationOfOperation", db::now()).await?;
            new_crl(&config, &db, &issuer).await?;
            println!("retired {serial}: revoked {n} certificate(s)");
            Ok(ExitCode::SUCCESS)
        }
        RegistrarCommand::Audit { config, verify } => {
            let db = connect(&config).await?.1;
            if !verify {
                for entry in audit::list(&db).await? {
                    println!("{}", audit::format_line(&entry));
                }
                return Ok(ExitCode::SUCCESS);
            }
            match audit::verify(&db).await? {
                None => {
                    println!("audit: {} rows, the chain holds", audit::list(&db).await?.len());
                    Ok(ExitCode::SUCCESS)
                }
                Some(id) => {
                    println!("audit-changed: row {id} was changed or removed (the chain breaks there)");
                    Ok(ExitCode::from(1))
                }
            }
        }
    }
}

async fn connect(config: &Path) -> Result<(Config, Db), RegistrarError> {
    let config = Config::load(config)?;
    let db = Db::connect(&config.database).await?;
    Ok((config, db))
}

async fn new_crl(config: &Config, db: &Db, issuer: &Issuer) -> Result<(), RegistrarError> {
    crl::regenerate(db, issuer, &config.crl_file, config.on_crl_change.as_deref(), db::now()).await?;
    Ok(())
}

/// The first line of standard input, without its line end.
fn read_password_line() -> Result<String, RegistrarError> {
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .map_err(|source| RegistrarError::File { path: "standard input".into(), source })?;
    let password = line.trim_end_matches(['\n', '\r']).to_string();
    if password.chars().count() < users::MIN_PASSWORD_LEN {
        return Err(RegistrarError::PasswordTooShort);
    }
    Ok(password)
}

//! `fleetctl`: keys, signing, the co-signer service, publishing,
//! provisioning (`provision.rs`), rollouts (`rollout.rs`) and the guided
//! demo (`demo.rs`).

// A command's error is built once, at its end, and printed: its size costs nothing.
#![allow(clippy::result_large_err)]

mod demo;
mod provision;
mod registrar;
mod rollout;

use crate::cosigner::{self, CosignerConfig, Registry};
use clap::{Args, Parser, Subcommand};
use fleetd::fsutil;
use fleetd::trust::{self, Claims, Envelope, Image, PublicKey, SigningKey, Target, CLAIMS_TYPE};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Why a command failed: each variant names its cause, and `main` prints
/// it as it is (`<error-name>: <detail>` for the typed ones).
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A file the command needs could not be read or written.
    #[error("{path}: {source}")]
    File { path: PathBuf, source: std::io::Error },
    /// A key file is not a usable ES256 key.
    #[error("{path}: {source}")]
    Key { path: PathBuf, source: trust::KeyError },
    /// A key file was refused before parsing (`key-permissions`, not a regular file, too large).
    #[error("{path}: {source}")]
    KeyFile { path: PathBuf, source: fsutil::ReadError },
    /// A message file that does not parse.
    #[error("{path}: {source}")]
    Message { path: PathBuf, source: trust::VerifyError },
    /// A flag is missing or does not fit the others.
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Config(#[from] fleetd::config::ConfigError),
    #[error(transparent)]
    Daemon(#[from] fleetd::daemon::DaemonError),
    #[error(transparent)]
    Boot(#[from] fleetd::boot::BootError),
    #[error(transparent)]
    Store(#[from] fleetd::store::StoreError),
    #[error(transparent)]
    Http(#[from] fleetd::http::HttpError),
    #[error(transparent)]
    Mqtt(#[from] fleetd::mqtt::MqttError),
    #[error(transparent)]
    Publish(#[from] crate::publish::FleetError),
    #[error(transparent)]
    Cosigner(#[from] cosigner::CosignerError),
    #[error(transparent)]
    Pack(#[from] crate::image::PackError),
    #[error(transparent)]
    FleetConfig(#[from] crate::rollout::config::FleetConfigError),
    #[error(transparent)]
    Rollout(Box<crate::rollout::RolloutError>),
    #[error("co-signer refused ({status}): {detail}")]
    CosignerRefused { status: u16, detail: String },
    #[error("runtime: {0}")]
    Runtime(std::io::Error),
    /// The device's portal refused or failed (`fleetctl provision`).
    #[error("{0}")]
    Portal(String),
    /// The guided demo went off its script (a step timed out, a check failed).
    #[error("demo: {0}")]
    Demo(String),
}

/// `.map_err(file_error(path))`: an IO error about `path`.
pub(crate) fn file_error(path: &Path) -> impl FnOnce(std::io::Error) -> CliError + '_ {
    move |source| CliError::File { path: path.to_path_buf(), source }
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(CliError::Runtime)
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Write IMAGE as DIR/NAME.zst (zstd's seekable format) and DIR/NAME.index
    /// (the block index), and print the `image` claim for `sign --claims`.
    Pack {
        image: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Raw bytes per zstd frame, a multiple of 4096.
        #[arg(long, default_value_t = crate::image::DEFAULT_FRAME_SIZE)]
        frame_size: u32,
        /// zstd's compression level.
        #[arg(long, default_value_t = crate::image::DEFAULT_LEVEL)]
        level: i32,
    },
}

/// `fleetctl`'s command line, for man pages and shell completions.
pub fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}

#[derive(Parser)]
#[command(name = "fleetctl", version, about = "Fleet-side tool for fleetd: keys, signing, co-signing")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a P-256 key pair: NAME.key.pem (0600) and NAME.pub.pem.
    Keygen {
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        name: String,
    },
    /// Sign update claims with one key; prints the JWS (general JSON serialization).
    Sign(Box<SignArgs>),
    /// Add one signature to an existing message.
    Cosign {
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        kid: String,
        #[arg(long)]
        out: Option<PathBuf>,
        /// The message, or `-` for standard input.
        file: PathBuf,
    },
    /// The co-signer service and its registry of fleet servers.
    #[command(subcommand)]
    Cosigner(CosignerCommand),
    /// The whole flow on this machine with embedded defaults, no root and
    /// no setup (`fleetd demo` runs this).
    Demo,
    /// Publish an update message to a device's or a group's update topic (QoS 1).
    Publish {
        #[command(flatten)]
        broker: BrokerArgs,
        #[arg(long)]
        project: String,
        #[arg(long, required_unless_present = "group", conflicts_with = "group")]
        device: Option<String>,
        #[arg(long)]
        group: Option<String>,
        /// The co-signed message, or `-` for standard input.
        file: PathBuf,
    },
    /// The registrar: serial-number registry, installers, claims, certificates, revocation.
    #[command(subcommand)]
    Registrar(registrar::RegistrarCommand),
    /// Rollouts: publish one to a group, follow it wave by wave, halt it.
    #[command(subcommand)]
    Rollout(rollout::RolloutCommand),
    /// Images: pack one for zstd and adaptive installs.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Provision a device over its access point (or wired portal), as a phone would.
    Provision(Box<provision::ProvisionArgs>),
    /// Print devices' status, progress and online messages as they change.
    Watch {
        #[command(flatten)]
        broker: BrokerArgs,
        #[arg(long)]
        project: String,
        /// Stop after this many messages.
        #[arg(long)]
        count: Option<usize>,
        /// Stop after this many seconds.
        #[arg(long)]
        timeout: Option<u64>,
    },
}

/// How the fleet side reaches the broker: mutual TLS with its own certificate.
#[derive(Args)]
struct BrokerArgs {
    #[arg(long)]
    host: String,
    #[arg(long, default_value_t = 8883)]
    port: u16,
    #[arg(long)]
    ca: PathBuf,
    #[arg(long)]
    cert: PathBuf,
    #[arg(long)]
    key: PathBuf,
    /// Defaults to `fleetctl-<random>`.
    #[arg(long)]
    client_id: Option<String>,
}

impl BrokerArgs {
    fn connection(&self) -> Result<crate::publish::FleetConnection, CliError> {
        Ok(crate::publish::FleetConnection {
            host: self.host.clone(),
            port: self.port,
            client_id: self.client_id.clone().unwrap_or_else(|| format!("fleetctl-{}", trust::random_id())),
            tls: Some(fleetd::mqtt::tls_config(&self.ca, &self.cert, &self.key)?),
        })
    }
}

#[derive(Args)]
struct SignArgs {
    #[arg(long)]
    key: PathBuf,
    #[arg(long)]
    kid: String,
    /// Claims as a JSON file (instead of the flags below).
    #[arg(long, conflicts_with_all = ["project", "hardware", "version", "url", "image", "size", "sha256"])]
    claims: Option<PathBuf>,
    #[arg(long)]
    project: Option<String>,
    #[arg(long)]
    hardware: Option<String>,
    /// A targeted device id (repeatable).
    #[arg(long = "device")]
    devices: Vec<String>,
    /// A targeted group (repeatable).
    #[arg(long = "group")]
    groups: Vec<String>,
    #[arg(long)]
    version: Option<u64>,
    /// Human-readable release name (defaults to the version).
    #[arg(long)]
    name: Option<String>,
    #[arg(long)]
    url: Option<String>,
    /// Compute size and sha256 from this image file.
    #[arg(long, conflicts_with_all = ["size", "sha256"])]
    image: Option<PathBuf>,
    #[arg(long)]
    size: Option<u64>,
    #[arg(long)]
    sha256: Option<String>,
    /// `zstd` when `--url` serves the `.zst` of `fleetctl image pack`.
    #[arg(long, value_parser = ["raw", "zstd"], default_value = "raw")]
    encoding: String,
    /// The block index's URL (adaptive installs); needs `--index`.
    #[arg(long, requires = "index")]
    index_url: Option<String>,
    /// The block index file: its size and sha256 go into the claims.
    #[arg(long, requires = "index_url")]
    index: Option<PathBuf>,
    /// A rollout wave, `PERCENT@TIME` (cumulative percent; TIME in seconds
    /// since the epoch, or `+SECONDS` from now). Repeatable, in order, the
    /// last at 100.
    #[arg(long = "wave")]
    waves: Vec<String>,
    /// Each device starts within this many seconds after its wave opens.
    #[arg(long, default_value_t = 0, requires = "waves")]
    spread_s: u64,
    /// Seconds from nbf to exp.
    #[arg(long, default_value_t = 24 * 3600)]
    valid_for: u64,
    /// nbf (seconds since the epoch); defaults to now.
    #[arg(long)]
    not_before: Option<u64>,
    /// iat (seconds since the epoch); defaults to now, or nbf if earlier.
    #[arg(long)]
    issued_at: Option<u64>,
    #[arg(long)]
    jti: Option<String>,
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Subcommand)]
enum CosignerCommand {
    /// Run the co-signer service.
    Serve {
        #[arg(long)]
        config: PathBuf,
    },
    /// Register a fleet server by its public key (it signs as kid `server:SERVER`).
    Register {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        key: PathBuf,
        /// Register a server that was revoked (its revocation is lifted).
        #[arg(long)]
        reinstate: bool,
        server: String,
    },
    /// Revoke a fleet server; its next request is refused.
    Revoke {
        #[arg(long)]
        config: PathBuf,
        server: String,
    },
    /// Ask a co-signer service to co-sign a server-signed message.
    Request {
        /// Base URL of the co-signer service.
        #[arg(long)]
        url: String,
        /// Trust only this CA for an https URL.
        #[arg(long)]
        ca: Option<PathBuf>,
        #[arg(long)]
        out: Option<PathBuf>,
        file: PathBuf,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        // Its own exit codes: 0 provisioned, 1 refused, 2 usage.
        Command::Provision(args) => return provision::command(&args),
        Command::Demo => return demo::run(),
        // Its own exit codes: 0 done, 1 refused (import: a row invalid; audit --verify: changed).
        Command::Registrar(cmd) => return registrar::command(cmd),
        // Its own exit codes: 0 done, 1 refused or halted, 3 watch timed out.
        Command::Rollout(cmd) => return rollout::command(cmd),
        Command::Image(ImageCommand::Pack { image, out, frame_size, level }) => {
            crate::image::pack(&image, &out, frame_size, level)
                .map(|packed| {
                    eprintln!(
                        "wrote {} ({} bytes, {:.1} % of the image) and {} ({} bytes)",
                        packed.zst.display(),
                        packed.zst_size,
                        packed.zst_size as f64 * 100.0 / packed.size as f64,
                        packed.index.display(),
                        packed.index_size
                    );
                    println!("{}", packed.claim());
                })
                .map_err(CliError::from)
        }
        Command::Keygen { out, name } => keygen(&out, &name).map(|(k, p)| {
            println!("wrote {} (private, 0600) and {}", k.display(), p.display());
        }),
        Command::Sign(args) => sign_command(&args),
        Command::Cosign { key, kid, out, file } => cosign_command(&key, &kid, &file, out.as_deref()),
        Command::Cosigner(cmd) => cosigner_command(cmd),
        Command::Publish { broker, project, device, group, file } => {
            publish_command(&broker, &project, device.as_deref(), group.as_deref(), &file)
        }
        Command::Watch { broker, project, count, timeout } => (|| -> Result<(), CliError> {
            let conn = broker.connection()?;
            runtime()?.block_on(crate::publish::watch(
                conn,
                &project,
                count,
                timeout.map(std::time::Duration::from_secs),
                |topic, payload| println!("{topic} {}", String::from_utf8_lossy(payload)),
            ))?;
            Ok(())
        })(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("fleetctl: {message}");
            ExitCode::from(1)
        }
    }
}

/// Writes `NAME.key.pem` (0600) and `NAME.pub.pem` in `dir`, refusing to overwrite.
pub fn keygen(dir: &Path, name: &str) -> Result<(PathBuf, PathBuf), CliError> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return Err(CliError::Usage(format!("key name {name:?} must be a plain file name")));
    }
    std::fs::create_dir_all(dir).map_err(file_error(dir))?;
    let key_path = dir.join(format!("{name}.key.pem"));
    let pub_path = dir.join(format!("{name}.pub.pem"));
    for p in [&key_path, &pub_path] {
        if p.exists() {
            return Err(CliError::Usage(format!("{} exists; refusing to overwrite a key", p.display())));
        }
    }
    let key = SigningKey::generate().map_err(|source| CliError::Key { path: key_path.clone(), source })?;
    fsutil::create_new(&key_path, key.to_pem().as_bytes(), 0o600).map_err(file_error(&key_path))?;
    fsutil::create_new(&pub_path, key.public_key().to_pem().as_bytes(), 0o644)
        .map_err(file_error(&pub_path))?;
    Ok((key_path, pub_path))
}

/// A private key file: refused when others may read it (as ssh does), PKCS#8 or SEC1.
pub fn load_signing_key(path: &Path) -> Result<SigningKey, CliError> {
    let pem = read_key_text(path, fsutil::read_private_key(path))?;
    SigningKey::from_pem(&pem).map_err(|source| CliError::Key { path: path.to_path_buf(), source })
}

pub fn load_public_key(path: &Path) -> Result<PublicKey, CliError> {
    let pem = read_key_text(path, fsutil::read_public_file(path))?;
    PublicKey::from_pem(&pem).map_err(|source| CliError::Key { path: path.to_path_buf(), source })
}

/// The text of a key file read by one of `fsutil`'s capped readers.
pub fn read_key_text(path: &Path, read: Result<Vec<u8>, fsutil::ReadError>) -> Result<String, CliError> {
    let bytes = read.map_err(|source| CliError::KeyFile { path: path.to_path_buf(), source })?;
    String::from_utf8(bytes)
        .map_err(|_| CliError::Key { path: path.to_path_buf(), source: trust::KeyError::BadBase64 })
}

/// Size and lowercase-hex SHA-256 of a file, streamed.
pub fn hash_file(path: &Path) -> Result<(u64, String), CliError> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(file_error(path))?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(file_error(path))?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, trust::hex(ctx.finish().as_ref())))
}

fn claims_from_args(args: &SignArgs) -> Result<Claims, CliError> {
    if let Some(path) = &args.claims {
        let bytes = fsutil::read_capped(path, trust::MAX_MESSAGE_BYTES).map_err(file_error(path))?;
        return Claims::parse(&bytes)
            .map_err(|source| CliError::Message { path: path.to_path_buf(), source });
    }
    let need = |v: &Option<String>, flag: &str| {
        v.clone().ok_or_else(|| CliError::Usage(format!("--{flag} is required (or --claims)")))
    };
    let version =
        args.version.ok_or_else(|| CliError::Usage("--version is required (or --claims)".into()))?;
    let (size, sha256) = match &args.image {
        Some(path) => hash_file(path)?,
        None => (
            args.size.ok_or_else(|| CliError::Usage("--size (or --image) is required".into()))?,
            need(&args.sha256, "sha256")?,
        ),
    };
    let now = fleetd::system_now();
    let nbf = args.not_before.unwrap_or(now);
    let rollout = if args.waves.is_empty() {
        None
    } else {
        let waves = args.waves.iter().map(|w| parse_wave(w, now)).collect::<Result<Vec<_>, _>>()?;
        let rollout = trust::Rollout { waves, spread_s: args.spread_s };
        rollout.check().map_err(CliError::Usage)?;
        Some(rollout)
    };
    Ok(Claims {
        typ: CLAIMS_TYPE.into(),
        jti: args.jti.clone().unwrap_or_else(trust::random_id),
        iat: args.issued_at.unwrap_or(now.min(nbf)),
        nbf,
        exp: nbf.saturating_add(args.valid_for),
        project: need(&args.project, "project")?,
        target: Target {
            hardware: need(&args.hardware, "hardware")?,
            devices: args.devices.clone(),
            groups: args.groups.clone(),
        },
        version,
        name: args.name.clone().unwrap_or_else(|| version.to_string()),
        image: Image {
            url: need(&args.url, "url")?,
            size,
            sha256,
            encoding: if args.encoding == "zstd" { trust::Encoding::Zstd } else { trust::Encoding::Raw },
            index: match (&args.index_url, &args.index) {
                (Some(url), Some(path)) => {
                    let (size, sha256) = hash_file(path)?;
                    Some(trust::IndexRef { url: url.clone(), size, sha256 })
                }
                _ => None,
            },
        },
        requires: vec![],
        rollout,
    })
}

/// `PERCENT@TIME`, TIME absolute or `+SECONDS` from `now`.
fn parse_wave(text: &str, now: u64) -> Result<trust::Wave, CliError> {
    let bad = || CliError::Usage(format!("--wave {text:?}: expected PERCENT@TIME or PERCENT@+SECONDS"));
    let (percent, time) = text.split_once('@').ok_or_else(bad)?;
    let percent: u8 = percent.trim_end_matches('%').parse().map_err(|_| bad())?;
    let not_before = match time.strip_prefix('+') {
        Some(delay) => now.saturating_add(delay.parse().map_err(|_| bad())?),
        None => time.parse().map_err(|_| bad())?,
    };
    Ok(trust::Wave { percent, not_before })
}

/// Signs `claims` with one key into a new envelope; `requires` lists every
/// feature the claims use, so an older device refuses what it cannot install.
pub fn sign_claims(claims: &Claims, key: &SigningKey, kid: &str) -> Result<Envelope, CliError> {
    let mut claims = claims.clone();
    claims.fill_requires();
    claims.check_structure().map_err(|e| CliError::Usage(format!("refusing to sign: {e}")))?;
    let mut envelope = Envelope::new(&claims.to_json());
    envelope.add_signature(key, kid).map_err(|source| CliError::Key { path: kid.into(), source })?;
    Ok(envelope)
}

/// Adds a signature by `kid`, refusing a kid that already signed.
pub fn add_signature(envelope: &mut Envelope, key: &SigningKey, kid: &str) -> Result<(), CliError> {
    if envelope.kids().iter().any(|k| k == kid) {
        return Err(CliError::Usage(format!("the message is already signed by {kid:?}")));
    }
    envelope.add_signature(key, kid).map_err(|source| CliError::Key { path: kid.into(), source })
}

fn write_output(out: Option<&Path>, text: &str) -> Result<(), CliError> {
    match out {
        Some(path) => {
            fsutil::atomic_write(path, format!("{text}\n").as_bytes(), 0o644).map_err(file_error(path))
        }
        None => {
            println!("{text}");
            Ok(())
        }
    }
}

pub(crate) fn read_envelope(file: &Path) -> Result<Envelope, CliError> {
    let bytes = fsutil::read_prefix(file, trust::MAX_MESSAGE_BYTES + 1).map_err(file_error(file))?;
    Envelope::parse(&bytes).map_err(|source| CliError::Message { path: file.to_path_buf(), source })
}

fn sign_command(args: &SignArgs) -> Result<(), CliError> {
    let claims = claims_from_args(args)?;
    let key = load_signing_key(&args.key)?;
    let envelope = sign_claims(&claims, &key, &args.kid)?;
    write_output(args.out.as_deref(), &envelope.to_json())
}

fn cosign_command(key: &Path, kid: &str, file: &Path, out: Option<&Path>) -> Result<(), CliError> {
    let mut envelope = read_envelope(file)?;
    add_signature(&mut envelope, &load_signing_key(key)?, kid)?;
    write_output(out, &envelope.to_json())
}

fn publish_command(
    broker: &BrokerArgs,
    project: &str,
    device: Option<&str>,
    group: Option<&str>,
    file: &Path,
) -> Result<(), CliError> {
    let envelope = read_envelope(file)?;
    let topic = match (device, group) {
        (Some(d), _) => fleetd::mqtt::Topics::update_for_device(project, d),
        (None, Some(g)) => fleetd::mqtt::Topics::update_for_group(project, g),
        (None, None) => return Err(CliError::Usage("--device or --group is required".into())),
    };
    let conn = broker.connection()?;
    let payload = envelope.to_json().into_bytes();
    runtime()?.block_on(crate::publish::publish(
        conn,
        &topic,
        payload,
        std::time::Duration::from_secs(30),
    ))?;
    println!("published to {topic}");
    Ok(())
}

fn cosigner_command(cmd: CosignerCommand) -> Result<(), CliError> {
    match cmd {
        CosignerCommand::Serve { config } => {
            let config = CosignerConfig::load(&config)?;
            let listen = config.listen.clone();
            let app = std::sync::Arc::new(cosigner::App::new(config)?);
            runtime()?.block_on(async move {
                let listener =
                    tokio::net::TcpListener::bind(&listen).await.map_err(file_error(Path::new(&listen)))?;
                let local = listener.local_addr().map_err(CliError::Runtime)?;
                println!("co-signer listening on http://{local}");
                cosigner::serve(listener, app, fleetd::sys::signals::shutdown())
                    .await
                    .map_err(CliError::Runtime)
            })
        }
        CosignerCommand::Register { config, key, reinstate, server } => {
            let config = CosignerConfig::load(&config)?;
            let key = load_public_key(&key)?;
            let path = config.registry_path();
            let mut registry = Registry::load(&path)?;
            registry.register(&server, &key, fleetd::system_now(), reinstate)?;
            registry.save(&path)?;
            println!(
                "registered server {server:?}: it signs as kid \"{}{server}\"",
                cosigner::SERVER_KID_PREFIX
            );
            Ok(())
        }
        CosignerCommand::Revoke { config, server } => {
            let config = CosignerConfig::load(&config)?;
            let path = config.registry_path();
            let mut registry = Registry::load(&path)?;
            registry.revoke(&server, fleetd::system_now())?;
            registry.save(&path)?;
            println!("revoked server {server:?}");
            Ok(())
        }
        CosignerCommand::Request { url, ca, out, file } => {
            let envelope = read_envelope(&file)?;
            let signed = runtime()?.block_on(request_cosignature(&url, &envelope, ca.as_deref()))?;
            write_output(out.as_deref(), &signed.to_json())
        }
    }
}

/// Sends a server-signed message to the co-signer and returns its answer.
pub async fn request_cosignature(
    base_url: &str,
    envelope: &Envelope,
    ca: Option<&Path>,
) -> Result<Envelope, CliError> {
    let url = format!("{}/v1/cosign", base_url.trim_end_matches('/'));
    let (status, body) = post_json(&url, envelope.to_json(), ca, trust::MAX_MESSAGE_BYTES).await?;
    if status != 200 {
        let detail = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("detail").and_then(|d| d.as_str()).map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        return Err(CliError::CosignerRefused { status, detail });
    }
    Envelope::parse(&body).map_err(|source| CliError::Message { path: "co-signer answer".into(), source })
}

/// POSTs a JSON body and returns the status and the (capped) response body.
async fn post_json(
    url: &str,
    body: String,
    ca_file: Option<&Path>,
    limit: usize,
) -> Result<(u16, Vec<u8>), fleetd::http::HttpError> {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    let uri: hyper::Uri = url.parse().map_err(|e| fleetd::http::HttpError::BadUrl(format!("{url}: {e}")))?;
    let tls = if uri.scheme_str() == Some("https") {
        fleetd::http::tls_config(ca_file)?
    } else {
        // Plain http still needs a config object; it is never used.
        fleetd::http::plain_tls_config()?
    };
    let request = hyper::Request::post(uri)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| fleetd::http::HttpError::BadUrl(e.to_string()))?;
    let response = fleetd::http::client(tls)
        .request(request)
        .await
        .map_err(|e| fleetd::http::HttpError::Connect(format!("{url}: {e}")))?;
    let status = response.status().as_u16();
    let limited = http_body_util::Limited::new(response.into_body(), limit);
    let bytes = limited.collect().await.map_err(|e| fleetd::http::HttpError::Body(e.to_string()))?.to_bytes();
    Ok((status, bytes.to_vec()))
}

//! Every refusal and failure of the registrar, by a stable name. The HTTP
//! API answers `{error: NAME, detail}` with the status each one maps to;
//! the CLI prints `NAME: detail`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use fleetd_core::provision::enroll::ErrorBody;
use std::path::PathBuf;

fleetd_core::error_name::named_error! {
    #[derive(Debug, thiserror::Error)]
    #[non_exhaustive]
    pub enum RegistrarError {
        #[name = "login-failed"]
        #[error("{name}: unknown user or wrong password")]
        LoginFailed,
        #[name = "locked-out"]
        #[error("{name}: too many failed logins; try again after {until}")]
        LockedOut { until: i64 },
        #[name = "rate-limited"]
        #[error("{name}: too many requests from this address; slow down")]
        RateLimited,
        #[name = "unauthorized"]
        #[error("{name}: {0}")]
        Unauthorized(&'static str),
        #[name = "forbidden"]
        #[error("{name}: role {role} may not {what}")]
        Forbidden { role: String, what: &'static str },
        #[name = "serial-invalid"]
        #[error("{name}: a serial is 1-64 characters of A-Z a-z 0-9 . _ : -")]
        SerialInvalid,
        #[name = "user-invalid"]
        #[error("{name}: a user name is 1-64 characters of a-z 0-9 . _ -")]
        UserInvalid,
        #[name = "role-invalid"]
        #[error("{name}: a role is admin or installer, got {0:?}")]
        RoleInvalid(String),
        #[name = "password-too-short"]
        #[error("{name}: a password has at least 8 characters")]
        PasswordTooShort,
        #[name = "user-exists"]
        #[error("{name}: user {0:?} exists already")]
        UserExists(String),
        /// The designed backend's "Invalid device serial number".
        #[name = "serial-unknown"]
        #[error("{name}: no device {0:?} in the registry")]
        SerialUnknown(String),
        #[name = "device-retired"]
        #[error("{name}: device {0:?} was retired")]
        DeviceRetired(String),
        /// The same refusal on renewal, answered 403 rather than 409.
        #[name = "device-retired"]
        #[error("{name}: device {0:?} was retired")]
        RenewRetired(String),
        #[name = "claim-invalid"]
        #[error("{name}: {0}")]
        ClaimInvalid(&'static str),
        #[name = "csr-invalid"]
        #[error("{name}: {0}")]
        CsrInvalid(String),
        #[name = "csr-cn-mismatch"]
        #[error("{name}: the CSR's CN is {got:?}, expected {expected:?}")]
        CsrCnMismatch { got: String, expected: String },
        #[name = "revoked"]
        #[error("{name}: the key that signed this renewal belongs to a revoked or superseded certificate")]
        Revoked,
        #[name = "renewal-invalid"]
        #[error("{name}: the renewal is not signed by a current key of this device")]
        RenewalInvalid,
        #[name = "certificate-expired"]
        #[error("{name}: the current certificate has expired; enroll again with a claim")]
        CertificateExpired,
        #[name = "malformed"]
        #[error("{name}: {0}")]
        Malformed(String),
        #[name = "content-type"]
        #[error("{name}: the body must be application/json")]
        ContentType,
        #[name = "body-too-large"]
        #[error("{name}: a body is at most {0} bytes")]
        BodyTooLarge(usize),
        #[name = "body-timeout"]
        #[error("{name}: the body did not arrive in time")]
        BodyTimeout,
        #[name = "not-found"]
        #[error("{name}: no such resource")]
        NotFound,
        #[name = "method-not-allowed"]
        #[error("{name}: not with this method")]
        MethodNotAllowed,
        #[name = "config-invalid"]
        #[error("{name}: {path}: {message}")]
        Config { path: PathBuf, message: String },
        #[name = "plain-http-not-loopback"]
        #[error("{name}: listen = {0:?} is not a loopback address, so [tls] is required")]
        PlainHttpNotLoopback(String),
        #[name = "key-permissions"]
        #[error("{name}: {path}: mode {mode:04o} lets others read this private key; `chmod 600` it")]
        KeyPermissions { path: PathBuf, mode: u32 },
        #[name = "file"]
        #[error("{name}: {path}: {source}")]
        File { path: PathBuf, source: std::io::Error },
        #[name = "ca-invalid"]
        #[error("{name}: {0}")]
        CaInvalid(String),
        #[name = "tls-invalid"]
        #[error("{name}: {0}")]
        TlsInvalid(String),
        #[name = "import-invalid"]
        #[error("{name}: {0}")]
        ImportInvalid(String),
        #[name = "database"]
        #[error("{name}: {0}")]
        Database(String),
        #[name = "internal"]
        #[error("{name}: {0}")]
        Internal(String),
    }
}

impl RegistrarError {
    /// The HTTP status this refusal is answered with.
    pub fn status(&self) -> StatusCode {
        use RegistrarError::*;
        match self {
            LoginFailed | Unauthorized(_) => StatusCode::UNAUTHORIZED,
            LockedOut { .. } | RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Forbidden { .. }
            | SerialUnknown(_)
            | RenewRetired(_)
            | ClaimInvalid(_)
            | CsrCnMismatch { .. }
            | Revoked
            | RenewalInvalid
            | CertificateExpired => StatusCode::FORBIDDEN,
            DeviceRetired(_) | UserExists(_) => StatusCode::CONFLICT,
            SerialInvalid | UserInvalid | RoleInvalid(_) | PasswordTooShort | CsrInvalid(_)
            | Malformed(_) | ImportInvalid(_) => StatusCode::BAD_REQUEST,
            ContentType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            NotFound => StatusCode::NOT_FOUND,
            MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The JSON body: the name, and the text after it.
    pub fn body(&self) -> ErrorBody {
        let text = self.to_string();
        let prefix = format!("{}: ", self.name());
        let detail = text.strip_prefix(&prefix).unwrap_or(&text).to_string();
        ErrorBody { error: self.name().to_string(), detail }
    }
}

impl From<sqlx::Error> for RegistrarError {
    fn from(e: sqlx::Error) -> Self {
        RegistrarError::Database(e.to_string())
    }
}

impl From<sqlx::migrate::MigrateError> for RegistrarError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        RegistrarError::Database(format!("migrations: {e}"))
    }
}

impl IntoResponse for RegistrarError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            // The detail of an internal failure stays in the log.
            eprintln!("registrar: {self}");
            let body = ErrorBody { error: self.name().into(), detail: "see the registrar's log".into() };
            return (status, axum::Json(body)).into_response();
        }
        (status, axum::Json(self.body())).into_response()
    }
}

pub type Result<T, E = RegistrarError> = std::result::Result<T, E>;

//! The command's exit codes, in one table, and [`Failure`]: what went wrong, what to do
//! about it, and the exit code. Every failure of every command maps here: a server's gRPC
//! status ([`from_status`]), a client-side error, a start-up error of `serve`.

use tonic::Code;

use crate::client::ClientError;
use crate::server::{StartError, StartFailure};

/// The exit codes, stable for scripts (README "CLI reference").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum Exit {
    /// Success.
    Ok = 0,
    /// Any other failure.
    Other = 1,
    /// The command line was wrong (also clap's own code for usage errors).
    Usage = 2,
    /// No such key, version or approval.
    NotFound = 3,
    /// Not authenticated, or not allowed by the access policy.
    Denied = 4,
    /// Invalid input, including a ciphertext that does not open.
    Input = 5,
    /// Refused in the key's current state, or a conflict.
    State = 6,
    /// The server, its HSM or database is unreachable, overloaded or timed out: retry later.
    Unavailable = 7,
    /// An audit export does not verify.
    NotVerified = 8,
    /// The configuration or a connection profile is wrong (EX_USAGE).
    Config = 64,
    /// A dependency of `serve` (HSM, database, a port) is unreachable (EX_UNAVAILABLE).
    Dependency = 69,
    /// A defect (EX_SOFTWARE): report it.
    Software = 70,
    /// A file could not be created (EX_CANTCREAT).
    CantCreate = 73,
}

impl Exit {
    /// The process exit status.
    pub fn code(self) -> i32 {
        self as i32
    }
}
/// A failure with what to do about it, and the exit code.
#[derive(Debug)]
pub struct Failure {
    pub(super) code: Exit,
    pub(super) message: String,
    pub(super) hint: Option<String>,
}

impl Failure {
    pub(super) fn new(code: Exit, message: impl Into<String>, hint: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            hint: Some(hint.into()),
        }
    }

    pub(super) fn input(message: impl Into<String>, hint: impl Into<String>) -> Self {
        Self::new(Exit::Input, message, hint)
    }
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Status(s) => from_status(&s),
            ClientError::Connect { .. } => Self::new(
                Exit::Unavailable,
                e.to_string(),
                "check the profile's endpoint and that `tresor serve` runs there; a certificate error means the profile's `ca` did not issue the server certificate",
            ),
            ClientError::Profile { .. } => Self::new(
                Exit::Config,
                e.to_string(),
                "fix the profile file (see README \"Connection profiles\")",
            ),
            ClientError::Envelope(_) => Self::new(
                Exit::Input,
                e.to_string(),
                "the data was not made by `Client::seal`, or was altered",
            ),
            ClientError::AuditItem(_) => Self::new(
                Exit::Other,
                e.to_string(),
                "report this with the request id",
            ),
        }
    }
}

/// Explains a server refusal: the code's meaning for a user, and what to try.
pub(super) fn from_status(s: &tonic::Status) -> Failure {
    let (code, hint) = match s.code() {
        Code::NotFound => (
            Exit::NotFound,
            "check the name: `tresor key list` shows your keys",
        ),
        Code::Unauthenticated => (
            Exit::Denied,
            "the server did not accept your certificate: check the profile's cert and key, that they are not expired, and that the server's client CA issued them",
        ),
        // The server names the rule in its message; the hint only says what can be done.
        Code::PermissionDenied if s.message().contains("access rule") => (
            Exit::Denied,
            "the operator's access rules refused this use: declare a justification they accept (--justification CODE --reference TICKET), or, where a rule requires approval, ask two officers for a window (tresor access request)",
        ),
        Code::PermissionDenied => (
            Exit::Denied,
            "your identity lacks the role or key in the server's access policy; ask the operator to grant it",
        ),
        Code::InvalidArgument | Code::OutOfRange => (
            Exit::Input,
            "check the input; for unwrap, the AAD must be exactly the one given at wrap time",
        ),
        Code::FailedPrecondition | Code::AlreadyExists | Code::Aborted => (
            Exit::State,
            "the key or version is not in a state that allows this: `tresor key get NAME` shows it",
        ),
        Code::Unavailable | Code::ResourceExhausted | Code::DeadlineExceeded => (
            Exit::Unavailable,
            "the server or its HSM or database is unavailable or busy; retry later, and give the operator the request id",
        ),
        Code::Unimplemented => (Exit::Other, "this server does not offer that yet"),
        Code::DataLoss => (
            Exit::Other,
            "the key version's HSM object is missing; tell the operator (request id above)",
        ),
        _ => (Exit::Other, "tell the operator, with the request id above"),
    };
    Failure::new(
        code,
        format!("{}: {}", code_name(s.code()), s.message()),
        hint,
    )
}

pub(super) fn code_name(c: Code) -> &'static str {
    match c {
        Code::NotFound => "not found",
        Code::Unauthenticated => "not authenticated",
        Code::PermissionDenied => "permission denied",
        Code::InvalidArgument => "invalid argument",
        Code::OutOfRange => "out of range",
        Code::FailedPrecondition => "failed precondition",
        Code::AlreadyExists => "already exists",
        Code::Aborted => "conflict",
        Code::Unavailable => "unavailable",
        Code::ResourceExhausted => "overloaded",
        Code::DeadlineExceeded => "timed out",
        Code::Unimplemented => "not implemented",
        Code::DataLoss => "data loss",
        _ => "error",
    }
}

impl From<StartError> for Failure {
    fn from(e: StartError) -> Self {
        let (code, hint) = match e.kind() {
            StartFailure::Config => (
                Exit::Config,
                "fix the configuration (README \"Configuration reference\")",
            ),
            StartFailure::Unavailable => (
                Exit::Dependency,
                "check that the HSM, the database and the listen address are reachable, then start again",
            ),
            StartFailure::Internal => (Exit::Software, "report this, with the log"),
        };
        Self::new(code, e.to_string(), hint)
    }
}

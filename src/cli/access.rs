//! `tresor access …`: break-glass access windows. One officer requests a window, a second
//! approves it; only while it is open do calls that a `require-approval` rule covers succeed.

use clap::Subcommand;

use super::exit::{Exit, Failure, from_status};
use super::files::confirm;
use super::output::Output;
use crate::client::Client;
use crate::proto;

#[derive(Debug, Subcommand)]
pub(super) enum AccessCommand {
    /// Ask for a window: IDENTITY may use keys matching KEYS for HOURS once a second officer
    /// approves.
    Request {
        /// The caller identity the window is for (URI SAN or CN).
        #[arg(long)]
        identity: String,
        /// A key name or a prefix ending in '*' (for KMIP, a managed object's Name).
        #[arg(long)]
        keys: String,
        /// Why: a justification code from the access policy (e.g. support, emergency).
        #[arg(long)]
        reason: String,
        /// A ticket or case number.
        #[arg(long, default_value = "")]
        reference: String,
        /// How long the window stays open once approved (at most the server's
        /// custody.max_access_window_hours).
        #[arg(long, conflicts_with = "minutes")]
        hours: Option<u32>,
        /// The same in minutes.
        #[arg(long)]
        minutes: Option<u32>,
    },
    /// Approve another officer's window request: it opens now.
    Approve {
        /// The window id (`tresor access list`).
        id: String,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// Your tenant's windows, newest first.
    List,
    /// Close an open window before its time (or withdraw a pending request).
    Close {
        /// The window id.
        id: String,
    },
}

pub(super) async fn access_command(
    client: &Client,
    command: AccessCommand,
    out: &Output,
) -> Result<(), Failure> {
    let mut access = client.access();
    match command {
        AccessCommand::Request {
            identity,
            keys,
            reason,
            reference,
            hours,
            minutes,
        } => {
            let seconds = match (hours, minutes) {
                (Some(h), _) => i64::from(h) * 3600,
                (None, Some(m)) => i64::from(m) * 60,
                (None, None) => {
                    return Err(Failure::new(
                        Exit::Usage,
                        "how long should the window be open?",
                        "give --hours N (or --minutes N)",
                    ));
                }
            };
            let w = access
                .request_access_window(proto::RequestAccessWindowRequest {
                    tenant: String::new(),
                    identity,
                    key_pattern: keys,
                    reason: Some(proto::Justification {
                        code: reason,
                        reference,
                    }),
                    duration: Some(prost_types::Duration { seconds, nanos: 0 }),
                })
                .await
                .map_err(|s| from_status(&s))?
                .into_inner();
            out.window(&w);
        }
        AccessCommand::Approve { id, yes } => {
            if !yes {
                confirm(
                    &format!(
                        "Approving {id} opens a break-glass window: its identity may use the keys it names until it expires or is closed."
                    ),
                    &id,
                )?;
            }
            client
                .admin()
                .approve(proto::ApprovalRequest { id: id.clone() })
                .await
                .map_err(|s| from_status(&s))?;
            let list = access
                .list_access_windows(proto::ListAccessWindowsRequest::default())
                .await
                .map_err(|s| from_status(&s))?
                .into_inner();
            match list.windows.iter().find(|w| w.id == id) {
                Some(w) => out.window(w),
                None => out.summary(&format!("approved {id}")),
            }
        }
        AccessCommand::List => {
            let list = access
                .list_access_windows(proto::ListAccessWindowsRequest::default())
                .await
                .map_err(|s| from_status(&s))?
                .into_inner();
            out.windows(&list.windows);
        }
        AccessCommand::Close { id } => {
            let w = access
                .close_access_window(proto::CloseAccessWindowRequest { id })
                .await
                .map_err(|s| from_status(&s))?
                .into_inner();
            out.window(&w);
        }
    }
    Ok(())
}

//! `tresor approvals …`: the second officer's list, approve and reject.

use clap::Subcommand;

use super::exit::{Failure, from_status};
use super::files::confirm;
use super::output::Output;
use crate::client::Client;
use crate::proto;

#[derive(Debug, Subcommand)]
pub(super) enum ApprovalCommand {
    /// Your tenant's destruction requests, newest first.
    List,
    /// Approve another officer's request: the version is destroyed after the grace period.
    Approve {
        /// The approval id (`tresor approvals list`).
        id: String,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// Reject a request (or withdraw your own).
    Reject {
        /// The approval id.
        id: String,
    },
}

pub(super) async fn approvals_command(
    client: &Client,
    command: ApprovalCommand,
    out: &Output,
) -> Result<(), Failure> {
    let mut admin = client.admin();
    match command {
        ApprovalCommand::List => {
            let list = admin
                .list_approvals(proto::ListApprovalsRequest::default())
                .await
                .map_err(|s| from_status(&s))?
                .into_inner();
            out.approvals(&list.approvals);
        }
        ApprovalCommand::Approve { id, yes } => {
            if !yes {
                confirm(
                    &format!(
                        "Approving {id} carries out the destruction it asks for (a key version's, after the grace period, or a KMIP object's)."
                    ),
                    &id,
                )?;
            }
            let a = admin
                .approve(proto::ApprovalRequest { id })
                .await
                .map_err(|s| from_status(&s))?
                .into_inner();
            out.approval(&a);
        }
        ApprovalCommand::Reject { id } => {
            let a = admin
                .reject(proto::ApprovalRequest { id })
                .await
                .map_err(|s| from_status(&s))?
                .into_inner();
            out.approval(&a);
        }
    }
    Ok(())
}

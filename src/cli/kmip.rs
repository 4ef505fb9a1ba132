//! `tresor kmip …`: officers see, revoke and destroy the managed objects KMIP clients hold
//! (never their material).

use clap::Subcommand;

use super::exit::{Failure, from_status};
use super::files::confirm;
use super::output::Output;
use crate::client::Client;
use crate::proto;

#[derive(Debug, Subcommand)]
pub(super) enum KmipCommand {
    /// Your tenant's managed objects, oldest first.
    List {
        /// Only objects with this KMIP Name.
        #[arg(long)]
        name: Option<String>,
        /// Only objects in this state (PRE_ACTIVE, ACTIVE, DEACTIVATED, COMPROMISED, DESTROYED,
        /// DESTROYED_COMPROMISED).
        #[arg(long)]
        state: Option<String>,
    },
    /// One object's attributes and state.
    Get {
        /// The object's Unique Identifier (`tresor kmip list`).
        id: String,
    },
    /// Revoke an object: KEY_COMPROMISE makes it COMPROMISED, any other reason DEACTIVATED.
    Revoke {
        /// The object's Unique Identifier.
        id: String,
        /// UNSPECIFIED, KEY_COMPROMISE, CA_COMPROMISE, AFFILIATION_CHANGED, SUPERSEDED,
        /// CESSATION_OF_OPERATION or PRIVILEGE_WITHDRAWN.
        #[arg(long)]
        reason: String,
        /// Free text kept with the revocation.
        #[arg(long, default_value = "")]
        message: String,
    },
    /// Destroy a revoked or never-activated object; a second officer approves unless the
    /// configuration says otherwise. Its material is removed after the tenant's grace period.
    Destroy {
        /// The object's Unique Identifier.
        id: String,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

pub(super) async fn kmip_command(
    client: &Client,
    command: KmipCommand,
    out: &Output,
) -> Result<(), Failure> {
    let mut objects = client.objects();
    match command {
        KmipCommand::List { name, state } => {
            let list = objects
                .list_managed_objects(proto::ListManagedObjectsRequest {
                    tenant: String::new(),
                    name: name.unwrap_or_default(),
                    state: state.map(|s| s.to_ascii_uppercase()).unwrap_or_default(),
                })
                .await
                .map_err(|s| from_status(&s))?
                .into_inner();
            out.managed_objects(&list.objects);
        }
        KmipCommand::Get { id } => {
            let o = objects
                .get_managed_object(proto::GetManagedObjectRequest { id })
                .await
                .map_err(|s| from_status(&s))?
                .into_inner();
            out.managed_object(&o);
        }
        KmipCommand::Revoke {
            id,
            reason,
            message,
        } => {
            let o = objects
                .revoke_managed_object(proto::RevokeManagedObjectRequest {
                    id,
                    reason: reason.to_ascii_uppercase(),
                    message,
                })
                .await
                .map_err(|s| from_status(&s))?
                .into_inner();
            out.managed_object(&o);
        }
        KmipCommand::Destroy { id, yes } => {
            if !yes {
                confirm(
                    &format!(
                        "Destroying KMIP object {id} removes its key: data encrypted under it becomes unreadable once the grace period ends."
                    ),
                    &id,
                )?;
            }
            let answer = objects
                .destroy_managed_object(proto::DestroyManagedObjectRequest { id })
                .await
                .map_err(|s| from_status(&s))?
                .into_inner();
            match (answer.object, answer.approval) {
                (Some(o), _) => out.managed_object(&o),
                (None, Some(a)) => out.approval(&a),
                (None, None) => {}
            }
        }
    }
    Ok(())
}

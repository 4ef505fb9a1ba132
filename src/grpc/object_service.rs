//! `tresor.v1.ManagedObjectAdminService` (role `officer`): KMIP's managed objects for the
//! officers of their tenant, to see, revoke and destroy; never their material.

use tonic::{Request, Response, Status};

use super::convert::{approval_message, timestamp};
use super::{Api, custody, done, invalid, status};
use crate::auth::Role;
use crate::custody::{ManagedObject, ObjectDestruction, ObjectState, RevocationCode};
use crate::model::Tenant;
use crate::proto;
use crate::proto::managed_object_admin_service_server::ManagedObjectAdminService;

fn object_message(o: ManagedObject) -> proto::ManagedObject {
    let time = |ms: i64| (ms != 0).then(|| timestamp(ms));
    let (reason, message) = o
        .revocation
        .map(|(code, text)| (code.as_str().to_owned(), text))
        .unwrap_or_default();
    proto::ManagedObject {
        id: o.id,
        tenant: o.tenant,
        name: o.name,
        algorithm: "AES".into(),
        length_bits: o.length_bits,
        state: o.state.as_str().into(),
        create_time: Some(timestamp(o.created_at)),
        activation_time: time(o.activation_date),
        deactivation_time: time(o.deactivation_date),
        compromise_time: time(o.compromise_date),
        destroy_time: time(o.destroy_date),
        revocation_reason: reason,
        revocation_message: message,
        has_material: o.has_material,
        attributes: o.attributes.into_iter().collect(),
        usage_mask: o.usage_mask,
    }
}

/// The audit record's key of an object.
fn object_key(tenant: &Tenant, id: &str) -> String {
    format!("tenants/{}/objects/{id}", tenant.as_str())
}

fn state_named(s: &str) -> Option<ObjectState> {
    [
        ObjectState::PreActive,
        ObjectState::Active,
        ObjectState::Deactivated,
        ObjectState::Compromised,
        ObjectState::Destroyed,
        ObjectState::DestroyedCompromised,
    ]
    .into_iter()
    .find(|state| state.as_str() == s)
}

#[tonic::async_trait]
impl ManagedObjectAdminService for Api {
    async fn list_managed_objects(
        &self,
        request: Request<proto::ListManagedObjectsRequest>,
    ) -> Result<Response<proto::ListManagedObjectsResponse>, Status> {
        let call = self
            .begin(&request, Role::Officer, "ListManagedObjects")
            .await?;
        let r = request.into_inner();
        let result = async {
            if !r.tenant.is_empty() {
                let tenant =
                    Tenant::new(&r.tenant).map_err(|e| invalid(&call, &format!("tenant: {e}")))?;
                call.grant
                    .check_tenant(&tenant)
                    .map_err(|e| status::denied(&e, &call.request_id))?;
            }
            let state = match r.state.as_str() {
                "" => None,
                s => Some(state_named(s).ok_or_else(|| {
                    invalid(
                        &call,
                        "state: one of PRE_ACTIVE, ACTIVE, DEACTIVATED, COMPROMISED, DESTROYED, DESTROYED_COMPROMISED",
                    )
                })?),
            };
            let name = (!r.name.is_empty()).then_some(r.name.as_str());
            let objects = self
                .custody
                .locate_objects(&call.grant, name, state)
                .await
                .map_err(|e| call.fail(&e))?;
            Ok(done(
                proto::ListManagedObjectsResponse {
                    objects: objects.into_iter().map(object_message).collect(),
                },
                "",
            ))
        }
        .await;
        self.finish(call, result, "", &[]).await
    }

    async fn get_managed_object(
        &self,
        request: Request<proto::GetManagedObjectRequest>,
    ) -> Result<Response<proto::ManagedObject>, Status> {
        let call = self
            .begin(&request, Role::Officer, "GetManagedObject")
            .await?;
        let id = request.into_inner().id;
        let key = object_key(call.grant.tenant(), &id);
        let out = self.custody.object(&call.grant, &id).await;
        let result = custody(&call, out, |o| done(object_message(o), ""));
        self.finish(call, result, &key, &[]).await
    }

    async fn revoke_managed_object(
        &self,
        request: Request<proto::RevokeManagedObjectRequest>,
    ) -> Result<Response<proto::ManagedObject>, Status> {
        let call = self
            .begin(&request, Role::Officer, "RevokeManagedObject")
            .await?;
        let r = request.into_inner();
        let key = object_key(call.grant.tenant(), &r.id);
        let result = match RevocationCode::parse(&r.reason) {
            None => Err(invalid(
                &call,
                "reason: one of UNSPECIFIED, KEY_COMPROMISE, CA_COMPROMISE, AFFILIATION_CHANGED, SUPERSEDED, CESSATION_OF_OPERATION, PRIVILEGE_WITHDRAWN",
            )),
            Some(code) => {
                let out = self
                    .custody
                    .revoke_object(&call.grant, &r.id, code, &r.message, 0)
                    .await;
                custody(&call, out, |o| done(object_message(o), ""))
            }
        };
        self.finish(call, result, &key, &[]).await
    }

    async fn destroy_managed_object(
        &self,
        request: Request<proto::DestroyManagedObjectRequest>,
    ) -> Result<Response<proto::DestroyManagedObjectResponse>, Status> {
        let call = self
            .begin(&request, Role::Officer, "DestroyManagedObject")
            .await?;
        let id = request.into_inner().id;
        let key = object_key(call.grant.tenant(), &id);
        let out = self.custody.officer_destroy_object(&call.grant, &id).await;
        let result = custody(&call, out, |d| {
            done(
                match d {
                    ObjectDestruction::Destroyed(o) => proto::DestroyManagedObjectResponse {
                        object: Some(object_message(o)),
                        approval: None,
                    },
                    ObjectDestruction::Requested(a) => proto::DestroyManagedObjectResponse {
                        object: None,
                        approval: Some(approval_message(a)),
                    },
                },
                "",
            )
        });
        self.finish(call, result, &key, &[]).await
    }
}

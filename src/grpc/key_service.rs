//! `tresor.v1.KeyService` (role `service`): Wrap, Unwrap, GenerateDataKey, Rewrap.

use tonic::{Request, Response, Status};
use zeroize::Zeroize;
use zeroize::Zeroizing;

use super::{Api, custody, done, done_secret, justify};
use crate::auth::Role;
use crate::proto;
use crate::proto::key_service_server::KeyService;

#[tonic::async_trait]
impl KeyService for Api {
    async fn wrap(
        &self,
        request: Request<proto::WrapRequest>,
    ) -> Result<Response<proto::WrapResponse>, Status> {
        let mut call = self.begin(&request, Role::Service, "Wrap").await?;
        let r = request.into_inner();
        if let Err(s) = justify(&mut call, r.justification.as_ref()) {
            return self.finish(call, Err(s), &r.key, &r.aad).await;
        }
        self.keyed(call, &r.key, &r.aad, async |call, key| {
            let out = self
                .custody
                .wrap(&call.grant, key, Zeroizing::new(r.plaintext), &r.aad)
                .await;
            custody(call, out, |w| {
                done(
                    proto::WrapResponse {
                        ciphertext: w.ciphertext,
                        key_version: w.key_version.clone(),
                    },
                    w.key_version,
                )
            })
        })
        .await
    }

    async fn unwrap(
        &self,
        request: Request<proto::UnwrapRequest>,
    ) -> Result<Response<proto::UnwrapResponse>, Status> {
        let mut call = self.begin(&request, Role::Service, "Unwrap").await?;
        let r = request.into_inner();
        if let Err(s) = justify(&mut call, r.justification.as_ref()) {
            return self.finish(call, Err(s), &r.key, &r.aad).await;
        }
        self.optionally_keyed(
            call,
            &r.key,
            &r.aad,
            &r.ciphertext,
            async |call, expected| {
                let out = self
                    .custody
                    .unwrap(&call.grant, &r.ciphertext, &r.aad, expected)
                    .await;
                // The response must own the bytes; what tonic does with them after encoding is out
                // of our hands (SECURITY.md). If the audit record fails, they are zeroized unsent.
                custody(call, out, |mut u| {
                    let plaintext = std::mem::take(&mut *u.plaintext);
                    done_secret(
                        proto::UnwrapResponse {
                            plaintext,
                            key_version: u.key_version.clone(),
                        },
                        u.key_version,
                        |r| r.plaintext.zeroize(),
                    )
                })
            },
        )
        .await
    }

    async fn generate_data_key(
        &self,
        request: Request<proto::GenerateDataKeyRequest>,
    ) -> Result<Response<proto::GenerateDataKeyResponse>, Status> {
        let mut call = self
            .begin(&request, Role::Service, "GenerateDataKey")
            .await?;
        let r = request.into_inner();
        if let Err(s) = justify(&mut call, r.justification.as_ref()) {
            return self.finish(call, Err(s), &r.key, &r.aad).await;
        }
        self.keyed(call, &r.key, &r.aad, async |call, key| {
            let len = if r.length_bytes == 0 {
                32
            } else {
                r.length_bytes as usize
            };
            let out = self
                .custody
                .generate_data_key(&call.grant, key, &r.aad, len, !r.without_plaintext)
                .await;
            custody(call, out, |mut dk| {
                let plaintext = dk
                    .plaintext
                    .as_mut()
                    .map(|p| std::mem::take(&mut **p))
                    .unwrap_or_default();
                let v = dk.key_version.clone();
                done_secret(
                    proto::GenerateDataKeyResponse {
                        plaintext,
                        ciphertext: dk.ciphertext,
                        key_version: dk.key_version,
                    },
                    v,
                    |r| r.plaintext.zeroize(),
                )
            })
        })
        .await
    }

    async fn rewrap(
        &self,
        request: Request<proto::RewrapRequest>,
    ) -> Result<Response<proto::RewrapResponse>, Status> {
        let mut call = self.begin(&request, Role::Service, "Rewrap").await?;
        let r = request.into_inner();
        if let Err(s) = justify(&mut call, r.justification.as_ref()) {
            return self.finish(call, Err(s), &r.key, &r.aad).await;
        }
        self.optionally_keyed(
            call,
            &r.key,
            &r.aad,
            &r.ciphertext,
            async |call, expected| {
                let out = self
                    .custody
                    .rewrap(&call.grant, &r.ciphertext, &r.aad, expected)
                    .await;
                custody(call, out, |w| {
                    let v = w.key_version.clone();
                    done(
                        proto::RewrapResponse {
                            ciphertext: w.ciphertext,
                            key_version: w.key_version,
                            rewrapped: w.rewrapped,
                        },
                        v,
                    )
                })
            },
        )
        .await
    }
}

//! Key-change notifications between nodes that share one PostgreSQL database.
//!
//! Owns the channel name, the payload format and the listener connection. Every store write
//! that changes a key's rows sends `NOTIFY tresor_keys, 'tenant/key'` inside its transaction,
//! so PostgreSQL delivers it to every listening node when, and only if, the change commits.
//! What a node does with a change (re-reading the key into its cache) is custody's business.
//!
//! A notification is lost only if the listener's connection is: then [`ChangeFeed::next`]
//! connects a new listener, starts listening, and only then answers [`Change::Missed`], so a
//! full reload that the caller does afterwards sees every change the gap could have hidden.

use std::time::Duration;

use secrecy::ExposeSecret;
use sqlx::postgres::PgListener;

use super::{Backend, Store, StoreError};

/// The `LISTEN/NOTIFY` channel for key changes.
pub const CHANNEL: &str = "tresor_keys";

/// The payload for a change of key `tenant/key` (key names never contain `/`).
pub fn payload(tenant: &str, key: &str) -> String {
    format!("{tenant}/{key}")
}

/// What the feed reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// This key's rows changed (on any node, this one included).
    Key {
        /// Tenant segment.
        tenant: String,
        /// Key segment.
        name: String,
    },
    /// Notifications may have been lost (the connection broke and was re-established): re-read
    /// everything.
    Missed,
}

/// The listening side of [`CHANNEL`].
#[derive(Debug)]
pub struct ChangeFeed {
    store: Store,
    listener: Option<PgListener>,
}

impl Store {
    /// A feed of key changes made by any node, listening from now on; `None` on SQLite, where
    /// this process is the only writer.
    pub async fn changes(&self) -> Result<Option<ChangeFeed>, StoreError> {
        if self.backend != Backend::Postgres {
            return Ok(None);
        }
        let listener = listen(self).await?;
        Ok(Some(ChangeFeed {
            store: self.clone(),
            listener: Some(listener),
        }))
    }
}

async fn listen(store: &Store) -> Result<PgListener, StoreError> {
    let mut listener = PgListener::connect(store.url.expose_secret()).await?;
    listener.listen(CHANNEL).await?;
    Ok(listener)
}

impl ChangeFeed {
    /// The next change. Waits for one; when the connection is lost, reconnects (retrying every
    /// second while the database is away) and answers [`Change::Missed`].
    pub async fn next(&mut self) -> Change {
        if let Some(listener) = self.listener.as_mut() {
            loop {
                match listener.try_recv().await {
                    Ok(Some(n)) => {
                        if let Some((tenant, name)) = n.payload().split_once('/') {
                            return Change::Key {
                                tenant: tenant.to_owned(),
                                name: name.to_owned(),
                            };
                        }
                        tracing::warn!(
                            payload = n.payload(),
                            "ignoring a malformed key-change notification"
                        );
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "key-change listener failed; reconnecting");
                        break;
                    }
                }
            }
        }
        // A fresh listener is listening before the caller re-reads, so nothing falls between.
        self.listener = None;
        loop {
            match listen(&self.store).await {
                Ok(listener) => {
                    self.listener = Some(listener);
                    tracing::info!("key-change listener connected; reloading all key metadata");
                    return Change::Missed;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "key-change listener cannot connect; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
}

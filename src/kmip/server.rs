//! The KMIP listener's connections: requests framed by their TTLV header, one at a time per
//! connection (KMIP clients wait for each answer), answered in order.
//!
//! Owns framing only: the shared TLS listener ([`crate::listener`]) accepted the connection
//! and verified the client certificate (KMIP requires one at the handshake); every message
//! goes to [`Kmip::handle`]. Bounded: a message's length ([`MAX_MESSAGE`]), the time to
//! receive it once its first byte arrived (the listener's header time), and the idle time
//! between messages (the listener's idle timeout).

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::ttlv::{self, tag};
use super::{Caller, Kmip, KmipError, MAX_MESSAGE};
use crate::auth::ClientAuthenticator;
use crate::listener::{Connection, ListenerLimits};

/// ALPN: KMIP has no ALPN name; clients send none.
pub const ALPN: &[&[u8]] = &[];

/// Serves the connections the shared TLS listener established, until `connections` closes or
/// the task is aborted (its connection tasks end with it).
pub async fn serve(
    kmip: Kmip,
    authenticator: ClientAuthenticator,
    mut connections: mpsc::Receiver<(Connection, SocketAddr)>,
    limits: ListenerLimits,
) {
    let mut serving = JoinSet::new();
    while let Some((tls, peer)) = connections.recv().await {
        while serving.try_join_next().is_some() {}
        let identity = match authenticator.identify(tls.tls().peer_certificates()) {
            Ok(identity) => Some(identity),
            Err(e) => {
                if crate::refusal_log::admit() {
                    tracing::warn!(%peer, error = %e, "KMIP client certificate names no identity");
                }
                None
            }
        };
        let caller = Caller {
            identity,
            peer: Some(peer),
        };
        serving.spawn(serve_connection(kmip.clone(), tls, caller, limits));
    }
}

async fn serve_connection(kmip: Kmip, mut tls: Connection, caller: Caller, limits: ListenerLimits) {
    loop {
        let mut header = [0u8; 8];
        // The first byte may take up to the idle timeout (the connection enforces it); the
        // rest of the message must follow within the header time.
        match tls.read(&mut header[..1]).await {
            Ok(1) => {}
            _ => return,
        }
        let rest = async {
            tls.read_exact(&mut header[1..]).await?;
            let announced = ttlv::announced_length(&header) as usize;
            let framed = header[3] == 0x01
                && u32::from_be_bytes([0, header[0], header[1], header[2]]) == tag::REQUEST_MESSAGE;
            if !framed || announced > MAX_MESSAGE - 8 {
                return Ok(None);
            }
            let mut message = vec![0u8; 8 + announced];
            message[..8].copy_from_slice(&header);
            tls.read_exact(&mut message[8..]).await?;
            Ok::<_, std::io::Error>(Some(message))
        };
        let message = match tokio::time::timeout(limits.header_timeout, rest).await {
            Ok(Ok(Some(message))) => zeroize::Zeroizing::new(message),
            Ok(Ok(None)) => {
                // Not a request message, or too long: answer why, then close, since the
                // stream cannot be re-synchronised.
                let answer = kmip
                    .unframed(
                        &caller,
                        KmipError::InvalidMessage(format!(
                            "expected a Request Message structure of at most {MAX_MESSAGE} bytes"
                        )),
                    )
                    .await;
                let _ = tls.write_all(&answer).await;
                let _ = tls.shutdown().await;
                return;
            }
            Ok(Err(_)) => return,
            Err(_) => {
                tracing::debug!(peer = ?caller.peer, "KMIP message not received within the header time; connection closed");
                return;
            }
        };
        let answer = kmip.handle(&caller, &message).await;
        if tls.write_all(&answer).await.is_err() || tls.flush().await.is_err() {
            return;
        }
    }
}

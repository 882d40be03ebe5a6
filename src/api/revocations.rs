//! `taskcred.v1.RevocationService`: the revocation watch stream. Each watch runs as a task that
//! ends when the client goes away or the broker stops.

use std::pin::Pin;

use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::Reply;
use super::auth::caller;
use super::convert::ts;
use super::pb;
use super::pb::WatchRevocationsRequest;
use super::pb::revocation_service_server::RevocationService;
use crate::broker::{Broker, WatchEvent};
use crate::lease::{Cursor, Revocation};
use crate::store::Epoch;

/// The revocation service.
#[derive(Debug, Clone)]
pub struct RevocationApi {
    broker: Broker,
}

impl RevocationApi {
    /// Serves `broker`'s revocation watches.
    pub fn new(broker: Broker) -> Self {
        Self { broker }
    }
}

fn revoked_to_pb(r: &Revocation) -> pb::Revoked {
    pb::Revoked {
        kind: r.kind.as_str().into(),
        credential_id: r.credential.clone(),
        lease_id: r.lease.to_string(),
        task_id: r.task.to_string(),
        agent: r.agent.to_string(),
        audience: r.audience.clone().unwrap_or_default(),
        reason: r.reason.clone(),
        revoked_at: ts(r.revoked_at),
        expires_at: ts(r.expires_at),
    }
}

fn epoch_to_pb(e: Option<&Epoch>) -> (String, Option<prost_types::Timestamp>) {
    e.map_or((String::new(), None), |e| (e.id.clone(), ts(e.started_at)))
}

fn event_to_pb(e: &WatchEvent) -> pb::RevocationEvent {
    use pb::revocation_event::Event;
    let (cursor, event) = match e {
        WatchEvent::Revoked(r) => (r.cursor, Event::Revoked(revoked_to_pb(r))),
        WatchEvent::Synced { cursor, epoch } => {
            let (store_epoch, store_epoch_started_at) = epoch_to_pb(epoch.as_ref());
            (
                *cursor,
                Event::Synced(pb::Synced {
                    store_epoch,
                    store_epoch_started_at,
                }),
            )
        }
        WatchEvent::Heartbeat { cursor, epoch } => {
            let (store_epoch, store_epoch_started_at) = epoch_to_pb(epoch.as_ref());
            (
                *cursor,
                Event::Heartbeat(pb::Heartbeat {
                    store_epoch,
                    store_epoch_started_at,
                }),
            )
        }
    };
    pb::RevocationEvent {
        cursor: cursor.to_string(),
        event: Some(event),
    }
}

/// The stream of one watch.
type EventStream = Pin<Box<dyn Stream<Item = Result<pb::RevocationEvent, Status>> + Send>>;

#[tonic::async_trait]
impl RevocationService for RevocationApi {
    type WatchRevocationsStream = EventStream;

    async fn watch_revocations(
        &self,
        request: Request<WatchRevocationsRequest>,
    ) -> Reply<EventStream> {
        let peer = caller(&request)?.clone();
        let req = request.into_inner();
        // `Cursor::parse` bounds the length (two numbers of at most 20 digits).
        let after = match req.after.as_str() {
            "" => None,
            s => Some(
                Cursor::parse(s)
                    .ok_or_else(|| super::convert::invalid("after", "not a cursor (<ms>-<seq>)"))?,
            ),
        };
        let audience = Some(req.audience).filter(|a| !a.is_empty());
        let mut watch = self
            .broker
            .watch_revocations(&peer, after, audience)
            .await?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    () = tx.closed() => break,
                    e = watch.next() => e,
                };
                // The broker stops: end the stream cleanly; the watcher resumes elsewhere.
                let item = match next {
                    Ok(Some(e)) => Ok(event_to_pb(&e)),
                    Ok(None) => break,
                    Err(e) => Err(Status::from(e)),
                };
                let last = item.is_err();
                if tx.send(item).await.is_err() || last {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

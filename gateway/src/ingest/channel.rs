//! The one channel from every source to the commit loop, bounded by count and by bytes.
//!
//! A count alone does not bound memory: 8,000 events of 64 KiB are 500 MiB. Each event takes
//! permits for its size from a semaphore of `[buffer] ingest_max_bytes` before it is queued,
//! and gives them back when the commit loop is done with it (after its commit), so events
//! queued plus the commit group in hand never exceed that. When it is used up, sources wait:
//! the policy when full is "block" (MQTT and serial flow control push back on the senders).

use std::sync::Arc;

use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use super::Incoming;

/// Fixed cost counted per event on top of its topic, source and payload.
const OVERHEAD: usize = 128;

/// One queued event and the memory it holds.
pub struct Queued {
    /// The event.
    pub incoming: Incoming,
    /// Released when dropped.
    _permit: Option<OwnedSemaphorePermit>,
    /// Bytes it counts for.
    pub size: usize,
}

impl Queued {
    /// Bytes it counts for.
    pub fn size(&self) -> usize {
        self.size
    }
}

/// The senders' end; cheap to clone.
#[derive(Clone)]
pub struct IngestTx {
    tx: mpsc::Sender<Queued>,
    bytes: Arc<Semaphore>,
    max_bytes: usize,
}

/// The commit loop's end.
pub type IngestRx = mpsc::Receiver<Queued>;

/// The commit loop went away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the store stopped")]
pub struct Closed;

/// A channel of at most `max_events` events and `max_bytes` bytes.
pub fn channel(max_events: usize, max_bytes: usize) -> (IngestTx, IngestRx) {
    let (tx, rx) = mpsc::channel(max_events.max(1));
    let max_bytes = max_bytes.clamp(OVERHEAD, Semaphore::MAX_PERMITS);
    (
        IngestTx {
            tx,
            bytes: Arc::new(Semaphore::new(max_bytes)),
            max_bytes,
        },
        rx,
    )
}

/// What an event counts for.
pub fn size_of(m: &Incoming) -> usize {
    m.event.payload.len() + m.event.topic.len() + m.event.source.len() + OVERHEAD
}

impl IngestTx {
    fn permits(&self, size: usize) -> u32 {
        // An event larger than the whole budget takes all of it (and so goes alone).
        size.min(self.max_bytes) as u32
    }

    /// Queues an event, waiting while the channel is full by count or by bytes.
    pub async fn send(&self, m: Incoming) -> Result<(), Closed> {
        let size = size_of(&m);
        let permit = self
            .bytes
            .clone()
            .acquire_many_owned(self.permits(size))
            .await
            .map_err(|_| Closed)?;
        self.tx
            .send(Queued {
                incoming: m,
                _permit: Some(permit),
                size,
            })
            .await
            .map_err(|_| Closed)
    }

    /// [`send`](Self::send) from a thread outside the runtime. While there is room (the
    /// common case) this takes no trip through the runtime: per event, that trip costs more
    /// than the rest of the hand-over.
    pub fn blocking_send(&self, m: Incoming, rt: &tokio::runtime::Handle) -> Result<(), Closed> {
        let size = size_of(&m);
        match self
            .bytes
            .clone()
            .try_acquire_many_owned(self.permits(size))
        {
            Ok(permit) => {
                let q = Queued {
                    incoming: m,
                    _permit: Some(permit),
                    size,
                };
                match self.tx.try_send(q) {
                    Ok(()) => Ok(()),
                    Err(mpsc::error::TrySendError::Full(q)) => {
                        self.tx.blocking_send(q).map_err(|_| Closed)
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => Err(Closed),
                }
            }
            Err(tokio::sync::TryAcquireError::Closed) => Err(Closed),
            Err(tokio::sync::TryAcquireError::NoPermits) => rt.block_on(self.send(m)),
        }
    }

    /// Bytes free now (for tests and status).
    pub fn available_bytes(&self) -> usize {
        self.bytes.available_permits()
    }
}

/// A queued event without a budget, for callers that build groups themselves (DLQ retry, tests).
pub fn unbudgeted(m: Incoming) -> Queued {
    let size = size_of(&m);
    Queued {
        incoming: m,
        _permit: None,
        size,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Event, Payload};

    fn ev(n: usize) -> Incoming {
        Incoming::plain(Event::new("mqtt", "t", Payload::Bytes(vec![0; n])))
    }

    #[tokio::test]
    async fn bytes_bound_the_queue_and_come_back_when_done() {
        let (tx, mut rx) = channel(1000, 10_000);
        tx.send(ev(4000)).await.unwrap();
        tx.send(ev(4000)).await.unwrap();
        // A third would pass 10,000 bytes: it waits.
        let third = tokio::time::timeout(std::time::Duration::from_millis(50), tx.send(ev(4000)));
        assert!(third.await.is_err(), "the byte budget must hold the sender");
        let first = rx.recv().await.unwrap();
        assert!(first.size() > 4000);
        drop(first);
        tx.send(ev(4000)).await.unwrap();
        // Larger than the whole budget: takes all of it, still goes.
        drop(rx.recv().await);
        drop(rx.recv().await);
        tx.send(ev(50_000)).await.unwrap();
        assert_eq!(tx.available_bytes(), 0);
    }
}

//! The writer of issuances: one thread that owns the write side of
//! [`issue_lease`](crate::store::LeaseStore::issue_lease), so that concurrent issuances share
//! one durable commit (group commit) instead of paying one fsync each.
//!
//! A caller queues its lease and awaits its answer. The queue is bounded ([`QUEUE`]): when it is
//! full the caller waits for room, and no tokio worker blocks. The thread blocks for the first
//! request, takes what else is queued (at most [`BATCH`] in all) and runs them in one write
//! transaction, each checked as [`issue_in`] checks it before any of its writes: a refused
//! request writes nothing, and a later one sees what an earlier one wrote (the same lease id
//! twice: the second is [`IssueError::Exists`]). The transaction commits once, durably as every
//! commit of the store, and only then are the callers answered: `Ok` means the lease is on disk.
//! A failed commit fails every request of its batch.
//!
//! A redb failure in the middle of the batch ([`IssueError::Store`]) may leave that request
//! half-written, so the transaction is dropped (aborted, nothing of it is written) and each
//! request of the batch runs again alone, in a transaction of its own: one bad request does not
//! fail the others.
//!
//! Why a thread of its own and not the blocking pool: it lives as long as the store and sleeps
//! in a blocking receive between batches, which would hold a pool thread for good. It ends when
//! the store's last handle drops: the queue closes, the thread runs what is left in it and
//! returns, and [`Writer`]'s drop waits for that, because the thread holds the [`Database`] and
//! redb lets one `Database` have the file: the file can be opened again at once.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::SystemTime;

use redb::Database;
use tokio::sync::{mpsc, oneshot};

use super::errors;
use super::leases::issue_in;
use crate::lease::Lease;
use crate::store::{IssueError, Revision, StoreError, VersionedTask};

/// How many issuances may wait for the writer before callers wait to queue theirs.
const QUEUE: usize = 1024;

/// The most issuances one transaction holds: bounds how long a batch keeps the write lock and
/// the first caller waits for the last one's checks.
const BATCH: usize = 256;

/// What [`issue_lease`](crate::store::LeaseStore::issue_lease) answers.
type Answer = Result<Option<VersionedTask>, IssueError>;

/// One queued issuance.
struct Request {
    lease: Lease,
    seen: Option<Revision>,
    now: SystemTime,
    answer: oneshot::Sender<Answer>,
}

/// The handle of the writer thread; the store holds one, shared by its clones.
pub(super) struct Writer {
    /// Declared before `thread`: fields drop in declaration order, so the queue is closed (and
    /// the thread's receive ends) before `thread` waits for it.
    queue: mpsc::Sender<Request>,
    #[expect(dead_code, reason = "held for its drop, which waits for the thread")]
    thread: Joined,
}

/// Waits for the thread when dropped.
struct Joined(Option<JoinHandle<()>>);

impl Drop for Joined {
    fn drop(&mut self) {
        if let Some(thread) = self.0.take() {
            // Err only if it panicked: it has no one left to answer, and the panic was printed.
            let _ = thread.join();
        }
    }
}

impl Writer {
    /// Starts the writer thread on `db`.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the thread cannot be started.
    pub(super) fn start(db: Arc<Database>) -> Result<Self, StoreError> {
        let (queue, requests) = mpsc::channel(QUEUE);
        let thread = std::thread::Builder::new()
            .name("taskcred-store-writer".into())
            .spawn(move || run(&db, requests))
            .map_err(errors::writer)?;
        Ok(Self {
            queue,
            thread: Joined(Some(thread)),
        })
    }

    /// Records `lease` in the next batch, and answers once that batch is committed. A caller
    /// that stops waiting does not stop the issuance (as a blocking-pool task is not stopped).
    pub(super) async fn issue(
        &self,
        lease: Lease,
        seen: Option<Revision>,
        now: SystemTime,
    ) -> Answer {
        let (answer, answered) = oneshot::channel();
        let request = Request {
            lease,
            seen,
            now,
            answer,
        };
        // Both fail only if the thread is gone (it panicked): nothing of this lease was written.
        let stopped = || IssueError::Store(errors::writer("stopped"));
        self.queue.send(request).await.map_err(|_| stopped())?;
        answered.await.unwrap_or_else(|_| Err(stopped()))
    }
}

#[cfg(test)]
impl Writer {
    /// How many issuances wait in the queue.
    pub(super) fn queued(&self) -> usize {
        self.queue.max_capacity() - self.queue.capacity()
    }
}

/// The writer thread: batch after batch until the queue is closed and empty.
fn run(db: &Database, mut requests: mpsc::Receiver<Request>) {
    let mut batch = Vec::with_capacity(BATCH);
    while let Some(first) = requests.blocking_recv() {
        batch.push(first);
        while batch.len() < BATCH {
            match requests.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let answers =
            together(db, &batch).unwrap_or_else(|| batch.iter().map(|r| alone(db, r)).collect());
        for (request, answer) in batch.drain(..).zip(answers) {
            // Err if the caller stopped waiting: its answer has no one to go to.
            let _ = request.answer.send(answer);
        }
    }
}

/// Runs `batch` in one transaction and commits it: each request's answer, or `None` when redb
/// failed in the middle (the transaction is then dropped, which aborts it).
fn together(db: &Database, batch: &[Request]) -> Option<Vec<Answer>> {
    let all = |e: IssueError| Some(vec![Err(e); batch.len()]);
    let txn = match db.begin_write() {
        Ok(txn) => txn,
        Err(e) => return all(e.into()),
    };
    let mut answers = Vec::with_capacity(batch.len());
    for r in batch {
        let answer = issue_in(&txn, &r.lease, r.seen, r.now);
        if let Err(IssueError::Store(_)) = answer {
            return None;
        }
        answers.push(answer);
    }
    match txn.commit() {
        Ok(()) => Some(answers),
        Err(e) => all(e.into()),
    }
}

/// Runs one request in a transaction of its own, as the store did before batches.
fn alone(db: &Database, r: &Request) -> Answer {
    let txn = db.begin_write()?;
    let answer = issue_in(&txn, &r.lease, r.seen, r.now)?;
    txn.commit()?;
    Ok(answer)
}

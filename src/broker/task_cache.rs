//! The broker's cache of approved tasks, so that an agent's issuances on one task do not read
//! the task from the store each time. A cached task is only the broker's *reading* of it: every
//! issuance still records its lease against the exact revision it decided on, in the store's
//! atomic step ([`LeaseStore::issue_lease`](crate::store::LeaseStore::issue_lease)), which
//! refuses a changed task; the broker then forgets or refreshes the entry and decides again.
//! Bounded: past [`CAPACITY`] entries the older half is dropped.

use std::collections::HashMap;
use std::ops::Deref;
use std::sync::{Arc, Mutex, OnceLock};

use crate::policy::PreparedTask;
use crate::store::{Revision, VersionedTask};
use crate::task::{Task, TaskId, TaskState};

/// Most tasks kept.
pub(super) const CAPACITY: usize = 4096;

/// A task as read at a revision, with what policy prepared of it (built once per revision).
#[derive(Debug)]
pub(super) struct CachedTask {
    task: Task,
    revision: Revision,
    prepared: OnceLock<Option<PreparedTask>>,
}

impl CachedTask {
    pub(super) fn new(read: VersionedTask) -> Self {
        Self {
            task: read.task,
            revision: read.revision,
            prepared: OnceLock::new(),
        }
    }

    /// What policy needs of the task, built on first use (none if it cannot be built: the
    /// decision is then made afresh, and refuses).
    pub(super) fn prepared(
        &self,
        build: impl FnOnce(&Task) -> Option<PreparedTask>,
    ) -> Option<&PreparedTask> {
        self.prepared.get_or_init(|| build(&self.task)).as_ref()
    }

    /// The revision the task was read at.
    pub(super) fn revision(&self) -> Revision {
        self.revision
    }
}

impl Deref for CachedTask {
    type Target = Task;
    fn deref(&self) -> &Task {
        &self.task
    }
}

/// The cache (see the module docs).
#[derive(Debug, Default)]
pub(super) struct TaskCache {
    inner: Mutex<Entries>,
}

#[derive(Debug, Default)]
struct Entries {
    /// Each entry with when it was put (a counter).
    by_id: HashMap<TaskId, (u64, Arc<CachedTask>)>,
    next: u64,
}

impl TaskCache {
    /// The cached task `id`, if any.
    pub(super) fn get(&self, id: &TaskId) -> Option<Arc<CachedTask>> {
        let entries = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        entries.by_id.get(id).map(|(_, t)| Arc::clone(t))
    }

    /// Keeps `read` if it is approved (the only state issuances are made in), else forgets it.
    /// Returns it either way.
    pub(super) fn put(&self, read: VersionedTask) -> Arc<CachedTask> {
        let cached = Arc::new(CachedTask::new(read));
        let mut entries = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if cached.state != TaskState::Approved {
            entries.by_id.remove(&cached.id);
            return cached;
        }
        if entries.by_id.len() >= CAPACITY && !entries.by_id.contains_key(&cached.id) {
            let keep_from = entries.next.saturating_sub(CAPACITY as u64 / 2);
            entries.by_id.retain(|_, (put, _)| *put >= keep_from);
        }
        let put = entries.next;
        entries.next += 1;
        entries.by_id.insert(cached.id, (put, Arc::clone(&cached)));
        cached
    }

    /// Forgets task `id` (it was refused, or changed).
    pub(super) fn forget(&self, id: &TaskId) {
        let mut entries = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        entries.by_id.remove(id);
    }

    /// How many tasks are kept.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .by_id
            .len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::identity::WorkloadId;
    use crate::task::{RawTaskRequest, TaskLimits, TaskRequest};

    fn read(quorum: u32, revision: u64) -> VersionedTask {
        let raw = RawTaskRequest {
            executor: "spiffe://taskcred.dev/agent/a".into(),
            purpose: "unit".into(),
            grants: vec![("db".into(), vec!["read".into()])],
            ..RawTaskRequest::default()
        };
        let request = TaskRequest::parse(raw, &TaskLimits::default()).unwrap();
        let task = Task::new(
            TaskId::generate(),
            request,
            WorkloadId::parse("spiffe://taskcred.dev/agent/r").unwrap(),
            quorum,
            Vec::new(),
            SystemTime::now(),
        );
        VersionedTask {
            task,
            revision: Revision(revision),
        }
    }

    #[test]
    fn keeps_approved_tasks_only_and_their_latest_revision() {
        let cache = TaskCache::default();
        let approved = read(0, 1);
        let id = approved.task.id;
        cache.put(approved.clone());
        assert_eq!(cache.get(&id).unwrap().revision(), Revision(1));
        cache.put(VersionedTask {
            revision: Revision(2),
            ..approved.clone()
        });
        assert_eq!(cache.get(&id).unwrap().revision(), Revision(2));
        // No longer approved (here: a task that needs approval): forgotten.
        let mut pending = approved;
        pending.task.state = TaskState::PendingApproval;
        cache.put(pending);
        assert!(cache.get(&id).is_none());
        let other = read(0, 1);
        let other_id = other.task.id;
        cache.put(other);
        cache.forget(&other_id);
        assert!(cache.get(&other_id).is_none());
        assert!(cache.get(&read(1, 1).task.id).is_none());
    }

    #[test]
    fn is_bounded_and_keeps_the_newer_half() {
        let cache = TaskCache::default();
        let ids: Vec<TaskId> = (0..CAPACITY + 1)
            .map(|_| cache.put(read(0, 1)).id)
            .collect();
        assert!(cache.len() <= CAPACITY / 2 + 1, "{}", cache.len());
        assert!(cache.get(ids.last().unwrap()).is_some());
        assert!(cache.get(&ids[0]).is_none());
    }
}

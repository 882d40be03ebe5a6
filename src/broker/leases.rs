//! Listing leases for operators: by task, by agent, by state, newest task first, paged by lease
//! (a page never holds more than its size, whatever the size of a task).

use super::{Broker, BrokerError};
use crate::identity::WorkloadId;
use crate::lease::{Lease, LeaseState};
use crate::policy::{PolicyAction, Resource};
use crate::store::TaskQuery;
use crate::task::TaskId;

/// Most leases in one page.
pub const MAX_LEASE_PAGE: usize = 500;
/// Tasks read per store call while listing.
const TASK_BATCH: usize = 64;
/// Most tasks examined for one page (bounds a selective filter's cost).
const MAX_SCAN: usize = 10_000;

/// The size of an operator's listing page (of leases, or of locks): 0 means 100.
///
/// # Errors
/// [`BrokerError::Invalid`] over `max`.
pub(super) fn page_size(asked: usize, max: usize) -> Result<usize, BrokerError> {
    match asked {
        0 => Ok(100),
        n if n <= max => Ok(n),
        _ => Err(BrokerError::Invalid {
            field: "page_size",
            reason: format!("at most {max}"),
        }),
    }
}

/// Where a page of leases starts: at the `skip`-th lease (in issuance order) of `task`, then the
/// tasks after it (newest first). Written `<task>/<skip>` in page tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseCursor {
    /// The task.
    pub task: TaskId,
    /// How many of its leases come before.
    pub skip: usize,
}

impl LeaseCursor {
    /// Parses `<task>/<skip>`.
    pub fn parse(s: &str) -> Option<Self> {
        let (task, skip) = s.split_once('/')?;
        if skip.len() > 9 || !skip.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some(Self {
            task: TaskId::parse(task).ok()?,
            skip: skip.parse().ok()?,
        })
    }
}

impl std::fmt::Display for LeaseCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.task, self.skip)
    }
}

/// Which leases to list.
#[derive(Debug, Clone, Default)]
pub struct LeaseQuery {
    /// Only the leases of this agent.
    pub agent: Option<WorkloadId>,
    /// Only the leases of this task.
    pub task: Option<TaskId>,
    /// Only in this state (as of now: an active lease past its expiry counts as expired).
    pub state: Option<LeaseState>,
    /// Most leases in the page (1 to [`MAX_LEASE_PAGE`]; 0 means 100).
    pub page_size: usize,
    /// Where to continue (the previous page's `next`).
    pub after: Option<LeaseCursor>,
}

/// One page of leases, newest task first, each task's in issuance order; never more than the
/// page size.
#[derive(Debug, Clone, Default)]
pub struct LeasePage {
    /// The leases, each with the cursor a page starting at it would have (so that a caller
    /// that must cut the page shorter, to fit a message, knows where to continue).
    pub leases: Vec<(Lease, LeaseCursor)>,
    /// Where the next page starts, if there may be more.
    pub next: Option<LeaseCursor>,
}

impl Broker {
    /// Lists leases (operators, by policy).
    ///
    /// # Errors
    /// [`BrokerError::Denied`], [`BrokerError::Invalid`] for a page size over
    /// [`MAX_LEASE_PAGE`] or a cursor of another task than the one asked,
    /// [`BrokerError::Unavailable`].
    pub async fn list_leases(
        &self,
        caller: &WorkloadId,
        query: LeaseQuery,
    ) -> Result<LeasePage, BrokerError> {
        self.authorize(caller, PolicyAction::ListLeases, &Resource::Broker)?;
        let size = page_size(query.page_size, MAX_LEASE_PAGE)?;
        let now = self.clock.now();
        let wanted = |l: &Lease| {
            query.agent.as_ref().is_none_or(|a| &l.agent == a)
                && query.state.is_none_or(|s| l.state == s)
        };
        let mut page = LeasePage::default();
        // Adds the leases of `task` from `skip` on; false once the page is full (`next` set).
        let take = |page: &mut LeasePage, task: TaskId, leases: Vec<Lease>, skip: usize| {
            for (i, mut lease) in leases.into_iter().enumerate().skip(skip) {
                let at = LeaseCursor { task, skip: i };
                if page.leases.len() >= size {
                    page.next = Some(at);
                    return false;
                }
                lease.expire(now);
                if wanted(&lease) {
                    page.leases.push((lease, at));
                }
            }
            true
        };
        if let Some(task) = query.task {
            let skip = match query.after {
                None => 0,
                Some(c) if c.task == task => c.skip,
                Some(_) => {
                    return Err(BrokerError::Invalid {
                        field: "page_token",
                        reason: "from a listing of another task".into(),
                    });
                }
            };
            let leases = self.store.task_leases(&task).await?;
            take(&mut page, task, leases, skip);
            return Ok(page);
        }
        // The cursor's task first (from its lease), then the tasks before it.
        let mut before = None;
        if let Some(c) = query.after {
            let leases = self.store.task_leases(&c.task).await?;
            if !take(&mut page, c.task, leases, c.skip) {
                return Ok(page);
            }
            before = Some(c.task);
        }
        let mut scanned = 0;
        loop {
            let tasks = self
                .store
                .list_tasks(&TaskQuery {
                    state: None,
                    executor: query.agent.clone(),
                    requester: None,
                    before,
                    limit: TASK_BATCH,
                    max_scan: MAX_SCAN,
                })
                .await?;
            for task in &tasks.tasks {
                if scanned >= MAX_SCAN {
                    page.next = Some(LeaseCursor {
                        task: task.id,
                        skip: 0,
                    });
                    return Ok(page);
                }
                scanned += 1;
                let leases = self.store.task_leases(&task.id).await?;
                if !take(&mut page, task.id, leases, 0) {
                    return Ok(page);
                }
            }
            match tasks.next {
                Some(n) => before = Some(n),
                None => return Ok(page),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn cursors_read_back_and_refuse_garbage() {
        let c = LeaseCursor {
            task: TaskId::generate(),
            skip: 1994,
        };
        assert_eq!(LeaseCursor::parse(&c.to_string()), Some(c));
        for bad in [
            "",
            "x/1",
            "/1",
            &format!("{}/", c.task),
            &format!("{}/-1", c.task),
            &format!("{}/1234567890", c.task),
            &format!("{}/1/2", c.task),
        ] {
            assert_eq!(LeaseCursor::parse(bad), None, "{bad}");
        }
    }
}

//! Listing leases for operators: by task, by agent, by state, newest task first, paged by task.

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
    /// Continue after this task (the previous page's `next`).
    pub after_task: Option<TaskId>,
}

/// One page of leases: the leases of whole tasks, newest task first.
#[derive(Debug, Clone, Default)]
pub struct LeasePage {
    /// The leases.
    pub leases: Vec<Lease>,
    /// Where the next page starts, if there may be more.
    pub next: Option<TaskId>,
}

impl Broker {
    /// Lists leases (operators, by policy).
    ///
    /// # Errors
    /// [`BrokerError::Denied`], [`BrokerError::Invalid`] for a page size over
    /// [`MAX_LEASE_PAGE`], [`BrokerError::Unavailable`].
    pub async fn list_leases(
        &self,
        caller: &WorkloadId,
        query: LeaseQuery,
    ) -> Result<LeasePage, BrokerError> {
        self.authorize(caller, PolicyAction::ListLeases, &Resource::Broker)?;
        let size = match query.page_size {
            0 => 100,
            n if n <= MAX_LEASE_PAGE => n,
            _ => {
                return Err(BrokerError::Invalid {
                    field: "page_size",
                    reason: format!("at most {MAX_LEASE_PAGE}"),
                });
            }
        };
        let now = self.clock.now();
        let wanted = |l: &Lease| {
            query.agent.as_ref().is_none_or(|a| &l.agent == a)
                && query.state.is_none_or(|s| l.state == s)
        };
        let as_of_now = |mut l: Lease| {
            l.expire(now);
            l
        };
        if let Some(task) = query.task {
            let leases = self.store.task_leases(&task).await?;
            return Ok(LeasePage {
                leases: leases.into_iter().map(as_of_now).filter(wanted).collect(),
                next: None,
            });
        }
        let mut page = LeasePage::default();
        let mut before = query.after_task;
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
                let leases = self.store.task_leases(&task.id).await?;
                page.leases
                    .extend(leases.into_iter().map(as_of_now).filter(wanted));
                scanned += 1;
                if page.leases.len() >= size || scanned >= MAX_SCAN {
                    page.next = Some(task.id);
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

//! `[delegation]`: how far agents may hand work on to other agents.

use serde::Deserialize;

use super::{CheckError, range};
use crate::task::DelegationLimits;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawDelegation {
    max_depth: usize,
    max_children: usize,
    max_tree_tasks: u32,
}

impl Default for RawDelegation {
    fn default() -> Self {
        let d = DelegationLimits::default();
        Self {
            max_depth: d.max_depth,
            max_children: d.max_children,
            max_tree_tasks: d.max_tree_tasks,
        }
    }
}

impl RawDelegation {
    pub(super) fn check(self) -> Result<DelegationLimits, CheckError> {
        Ok(DelegationLimits {
            max_depth: range("delegation.max_depth", self.max_depth, 0, 8)?,
            max_children: range("delegation.max_children", self.max_children, 1, 64)?,
            max_tree_tasks: range("delegation.max_tree_tasks", self.max_tree_tasks, 1, 1024)?,
        })
    }
}

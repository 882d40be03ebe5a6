//! The Lua scripts of the Redis store: every multi-step change, one script each, kept as files in
//! `lua/` (each opens with what it takes as `KEYS` and `ARGV` and what it returns) and built once
//! into [`Scripts`]. The helpers of `lua/lease.lua` (the record's offsets, the revocation step,
//! its log entry and the bounded chunk of a task's revocation) are prepended to the scripts
//! that call them, so that each is written once. Scripts take every key they can as `KEYS`, and
//! the ones they can only build from what they read as templates from [`super::keys`].

use redis::Script;

/// The lease record helpers (`lua/lease.lua`).
const LEASE: &str = include_str!("lua/lease.lua");

/// The scripts, each loaded by redis-rs on first use (`EVALSHA`, then `EVAL` if the server does
/// not know it).
pub(super) struct Scripts {
    /// Writes a new task (`lua/create.lua`).
    pub(super) create: Script,
    /// Replaces a task at the version read (`lua/compare_and_set.lua`).
    pub(super) cas: Script,
    /// Records a lease (`lua/issue.lua`).
    pub(super) issue: Script,
    /// Reads a lease with its task's end (`lua/read_lease.lua`).
    pub(super) read_lease: Script,
    /// Ends a task and revokes the first chunk of its leases (`lua/end_task.lua`).
    pub(super) end_task: Script,
    /// Revokes the next chunk of an ended task's leases (`lua/end_chunk.lua`).
    pub(super) end_chunk: Script,
    /// Gives a lease a new credential (`lua/renew.lua`).
    pub(super) renew: Script,
    /// Revokes one lease (`lua/revoke_lease.lua`).
    pub(super) revoke_lease: Script,
    /// Locks an agent (`lua/lock.lua`).
    pub(super) lock: Script,
    /// One bounded step of a lock's sweep (`lua/sweep.lua`).
    pub(super) sweep: Script,
    /// Claims one due lease and ends it as expired (`lua/expire.lua`).
    pub(super) expire: Script,
    /// Deletes a claim still holding a value (`lua/release_claim.lua`).
    pub(super) release: Script,
    /// Replaces a claim still holding a value (`lua/swap_claim.lua`).
    pub(super) swap: Script,
    /// Replaces a value still holding what it held (`lua/replace.lua`).
    pub(super) replace: Script,
    /// Files a task among its executor's open tasks unless locked (`lua/enrol.lua`).
    pub(super) enrol: Script,
    /// Copies a lock into tasks (`lua/mark.lua`).
    pub(super) mark: Script,
    /// The agent's half of a lock's sweep step (`lua/sweep_take.lua`).
    pub(super) sweep_take: Script,
    /// Reads a bucket's revocation log with its server's clock (`lua/log_read.lua`).
    pub(super) log_read: Script,
}

impl Scripts {
    /// The scripts, with their helpers prepended.
    pub(super) fn new() -> Self {
        Self {
            create: Script::new(include_str!("lua/create.lua")),
            cas: Script::new(include_str!("lua/compare_and_set.lua")),
            issue: with_lease(include_str!("lua/issue.lua")),
            read_lease: with_lease(include_str!("lua/read_lease.lua")),
            end_task: with_lease(include_str!("lua/end_task.lua")),
            end_chunk: with_lease(include_str!("lua/end_chunk.lua")),
            renew: with_lease(include_str!("lua/renew.lua")),
            revoke_lease: with_lease(include_str!("lua/revoke_lease.lua")),
            lock: Script::new(include_str!("lua/lock.lua")),
            sweep: with_lease(include_str!("lua/sweep.lua")),
            expire: with_lease(include_str!("lua/expire.lua")),
            release: Script::new(include_str!("lua/release_claim.lua")),
            swap: Script::new(include_str!("lua/swap_claim.lua")),
            replace: Script::new(include_str!("lua/replace.lua")),
            enrol: Script::new(include_str!("lua/enrol.lua")),
            mark: Script::new(include_str!("lua/mark.lua")),
            sweep_take: Script::new(include_str!("lua/sweep_take.lua")),
            log_read: Script::new(include_str!("lua/log_read.lua")),
        }
    }
}

/// A script that begins with the lease helpers.
fn with_lease(body: &str) -> Script {
    let mut code = LEASE.to_owned();
    code.push('\n');
    code.push_str(body);
    Script::new(&code)
}

//! The agent's decision core: which commands to accept (the generation fence), what to do with a
//! VMM that exits (the restart policy), and when to kill every VMM because the host's etcd lease
//! could not be renewed (self-fencing). Time is an argument; no clock, socket or thread.
//!
//! # Self-fencing
//! A keep-alive sent at `s` that succeeds proves the lease lives until at least `s + TTL` (etcd
//! extends it from when it receives the keep-alive, which is after `s`). The agent kills its VMMs
//! at `s + TTL − margin` unless a later keep-alive succeeded. The controller sees the lease expire
//! at `e ≥ s + TTL` and acts only at `e + margin`, so it restarts a VM elsewhere at least
//! `2 × margin` after this host stopped it, as long as both clocks run at about the same rate.
//!
//! # Per-VM lifecycle
//! ```text
//!   start ──▶ Starting ──(VMM up)──▶ Running ──(migrate_out ok)──▶ gone
//!                │                     │  └──(exit, not asked)──▶ restart after back-off
//!                └──(exit)─────────────┴──▶ Exited (restart budget spent, or stopped)
//!   receive ──▶ Receiving ──(VM arrives)──▶ Running
//! ```

#![deny(clippy::disallowed_methods)]
use std::collections::{BTreeMap, VecDeque};

use tern_api::agent::{Command, CommandBody, CommandReply, ObservedState, ObservedVm};
use tern_api::cluster::VmCreate;

/// Replies remembered for repeated command ids.
const REPLIES_KEPT: usize = 256;

/// The agent's knobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// The etcd lease TTL, ms.
    pub lease_ttl_ms: u64,
    /// Kill the VMMs this long before the lease could expire, ms.
    pub fence_margin_ms: u64,
    /// Restarts allowed within `restart_window_ms` before the agent gives a VM up.
    pub restart_limit: u32,
    /// The window of the restart budget, ms.
    pub restart_window_ms: u64,
    /// Wait before a restart, ms (doubles with each restart in the window).
    pub restart_backoff_ms: u64,
    /// A receiver that has not started running its VM by then is stopped, ms.
    pub receive_timeout_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            lease_ttl_ms: 5_000,
            fence_margin_ms: 2_000,
            restart_limit: 3,
            restart_window_ms: 60_000,
            restart_backoff_ms: 500,
            receive_timeout_ms: 60_000,
        }
    }
}

/// What the shell reports to the core.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// A command arrived.
    Command(Command),
    /// A lease grant or keep-alive sent at `sent_ms` succeeded.
    LeaseRenewed {
        /// When the request was sent.
        sent_ms: u64,
        /// The lease's id (a new one after a grant).
        lease: u64,
    },
    /// The lease is gone for good (revoked or expired as etcd says): fence now.
    LeaseLost,
    /// A VMM for `vm` is up and its guest runs (or, for a receiver, the VM arrived and runs).
    VmmRunning {
        /// The VM.
        vm: String,
    },
    /// The receiver for `vm` listens at `listen`.
    ReceiverListening {
        /// The VM.
        vm: String,
        /// `ADDR:PORT`.
        listen: String,
    },
    /// The VMM of `vm` exited.
    VmmExited {
        /// The VM.
        vm: String,
        /// Why, for the log.
        status: String,
    },
    /// A migration out of this host ended.
    MigrationEnded {
        /// The VM.
        vm: String,
        /// How.
        outcome: MigrationOutcome,
        /// The VMM's report (JSON), if any.
        report: Option<serde_json::Value>,
    },
    /// Time passed.
    Tick,
}

/// How a migration out ended, from the source's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationOutcome {
    /// The VM runs on the target; the source VMM has stopped.
    Completed,
    /// It failed before the commit; the VM still runs here.
    Failed,
    /// The commit had no answer; the VM is paused here.
    InDoubt,
    /// Post-copy failed after the switch: the target stopped the guest and the copy here is
    /// stale (it refuses to run), so the agent kills it; the VM runs nowhere.
    Lost,
}

/// What the shell must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Answer command `id` of `generation`.
    Reply {
        /// The command's generation.
        generation: u64,
        /// The command's id.
        id: u64,
        /// The agent's event counter when it answered.
        seq: u64,
        /// The answer.
        reply: CommandReply,
    },
    /// Start a VMM for the VM (`tern vm run`).
    Spawn {
        /// The VM.
        spec: VmCreate,
        /// Its disk URL.
        disk_url: Option<String>,
    },
    /// Start a receiver for the VM (`tern vm receive`), then report [`Input::ReceiverListening`].
    SpawnReceiver {
        /// The VM.
        spec: VmCreate,
        /// Its disk URL.
        disk_url: Option<String>,
    },
    /// Migrate the VM to `to` (`tern vm migrate`), then report [`Input::MigrationEnded`].
    Migrate {
        /// The VM.
        vm: String,
        /// The target's listener.
        to: String,
        /// The volume node id to hand the disk lease to.
        disk_successor: Option<u32>,
        /// Switch to post-copy after this many pre-copy rounds.
        post_copy_after: Option<u32>,
    },
    /// Resume the paused VM.
    Resume {
        /// The VM.
        vm: String,
    },
    /// Kill the VM's VMM (SIGKILL works on a frozen one too).
    Kill {
        /// The VM.
        vm: String,
    },
}

#[derive(Debug, Clone)]
struct Supervised {
    spec: VmCreate,
    disk_url: Option<String>,
    state: ObservedState,
    /// Stop was asked: an exit is expected.
    stopping: bool,
    /// A migration out is under way: the command waiting for its end.
    migrating: Option<(u64, u64)>,
    /// A receive command waiting for the listener.
    receiving: Option<(u64, u64)>,
    restarts: VecDeque<u64>,
    restart_at_ms: Option<u64>,
    /// For a receiver: when it gives up waiting for the VM.
    receive_deadline_ms: Option<u64>,
}

/// The agent's state machine. See the module docs.
#[derive(Debug, Clone)]
pub struct Agent {
    cfg: Config,
    highest_generation: u64,
    /// The highest command id of `highest_generation` handled.
    last_command_id: u64,
    /// Send time of the last keep-alive that succeeded.
    renewed_sent_ms: Option<u64>,
    /// The current etcd lease.
    lease: Option<u64>,
    fenced: bool,
    vms: BTreeMap<String, Supervised>,
    replies: BTreeMap<(u64, u64), CommandReply>,
    reply_order: VecDeque<(u64, u64)>,
    outbox: Vec<Action>,
    /// Rises with every input handled.
    seq: u64,
    /// Times this agent killed its VMMs for want of a lease.
    pub self_fences: u64,
}

impl Agent {
    /// An agent with no lease yet (it refuses commands until it has one).
    pub fn new(cfg: Config) -> Agent {
        Agent {
            cfg,
            highest_generation: 0,
            last_command_id: 0,
            renewed_sent_ms: None,
            lease: None,
            fenced: false,
            vms: BTreeMap::new(),
            replies: BTreeMap::new(),
            reply_order: VecDeque::new(),
            outbox: Vec::new(),
            seq: 0,
            self_fences: 0,
        }
    }

    /// An agent restarting after a crash: it has no lease and no VMs (they died with it), but keeps
    /// refusing every generation below the highest it had seen, which its shell keeps on disk.
    pub fn restore(cfg: Config, generation_seen: u64) -> Agent {
        let mut a = Agent::new(cfg);
        a.highest_generation = generation_seen;
        a
    }

    /// The highest controller generation seen (the shell keeps it on disk whenever it rises).
    pub fn generation_seen(&self) -> u64 {
        self.highest_generation
    }

    /// Whether the VMMs were killed for want of a lease (until the next successful renewal).
    pub fn is_fenced(&self) -> bool {
        self.fenced
    }

    /// When the VMMs will be killed unless the lease is renewed first.
    pub fn fence_deadline_ms(&self) -> Option<u64> {
        self.renewed_sent_ms.map(|s| {
            s + self
                .cfg
                .lease_ttl_ms
                .saturating_sub(self.cfg.fence_margin_ms)
        })
    }

    /// The event counter: reports carry it, and so do replies.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The highest command id of [`Agent::generation_seen`] handled so far.
    pub fn last_command_id(&self) -> u64 {
        self.last_command_id
    }

    /// What the agent reports of its VMs.
    pub fn observed(&self) -> Vec<ObservedVm> {
        self.vms
            .iter()
            .map(|(name, v)| ObservedVm {
                name: name.clone(),
                state: v.state,
                cpu_utilization: None,
                rss_mib: None,
                guest_resident_kib: None,
                guest_nonzero_kib: None,
                dirty_pages_per_sec: None,
            })
            .collect()
    }

    /// Whether a migration out of `vm` is under way (its VMM then refuses a dirty-rate sample).
    pub fn is_migrating(&self, vm: &str) -> bool {
        self.vms.get(vm).is_some_and(|v| v.migrating.is_some())
    }

    /// What the agent sees of one VM.
    pub fn state_of(&self, vm: &str) -> ObservedState {
        self.vms.get(vm).map_or(ObservedState::Absent, |v| v.state)
    }

    /// Takes the actions decided so far.
    pub fn drain_actions(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.outbox)
    }

    /// Feeds one input at `now_ms`.
    pub fn step(&mut self, input: Input, now_ms: u64) {
        self.seq += 1;
        match input {
            Input::Command(cmd) => self.command(cmd, now_ms),
            Input::LeaseRenewed { sent_ms, lease } => {
                if self.lease != Some(lease) {
                    // A new registration: whatever was sent to the earlier one is void.
                    self.lease = Some(lease);
                    self.renewed_sent_ms = None;
                }
                if self.renewed_sent_ms.is_none_or(|s| sent_ms > s) {
                    self.renewed_sent_ms = Some(sent_ms);
                }
                // A renewal after a fence is a new lease: the host starts empty.
                if self.fenced && !self.past_deadline(now_ms) {
                    self.fenced = false;
                }
            }
            Input::LeaseLost => self.fence(),
            Input::VmmRunning { vm } => {
                if let Some(v) = self.vms.get_mut(&vm)
                    && matches!(v.state, ObservedState::Starting | ObservedState::Receiving)
                {
                    v.state = ObservedState::Running;
                }
            }
            Input::ReceiverListening { vm, listen } => {
                if let Some(v) = self.vms.get_mut(&vm)
                    && let Some((generation, id)) = v.receiving.take()
                {
                    let reply = CommandReply::Done {
                        listen: Some(listen),
                        report: None,
                        vm_state: None,
                    };
                    self.reply(generation, id, reply);
                }
            }
            Input::VmmExited { vm, status } => self.exited(&vm, &status, now_ms),
            Input::MigrationEnded {
                vm,
                outcome,
                report,
            } => self.migration_ended(&vm, outcome, report),
            Input::Tick => {}
        }
        self.tick(now_ms);
    }

    fn past_deadline(&self, now: u64) -> bool {
        self.fence_deadline_ms().is_some_and(|d| now >= d)
    }

    fn tick(&mut self, now: u64) {
        if !self.fenced && self.past_deadline(now) && !self.vms.is_empty() {
            self.fence();
        } else if !self.fenced && self.past_deadline(now) {
            self.fenced = true;
            self.self_fences += 1;
        }
        if self.fenced {
            return;
        }
        let given_up: Vec<String> = self
            .vms
            .iter()
            .filter(|(_, v)| {
                v.state == ObservedState::Receiving
                    && !v.stopping
                    && v.receive_deadline_ms.is_some_and(|d| now >= d)
            })
            .map(|(n, _)| n.clone())
            .collect();
        for vm in given_up {
            if let Some(v) = self.vms.get_mut(&vm) {
                v.stopping = true;
            }
            self.outbox.push(Action::Kill { vm });
        }
        let due: Vec<String> = self
            .vms
            .iter()
            .filter(|(_, v)| v.restart_at_ms.is_some_and(|t| now >= t))
            .map(|(n, _)| n.clone())
            .collect();
        for name in due {
            if let Some(v) = self.vms.get_mut(&name) {
                v.restart_at_ms = None;
                v.restarts.push_back(now);
                v.state = ObservedState::Starting;
                let (spec, disk_url) = (v.spec.clone(), v.disk_url.clone());
                self.outbox.push(Action::Spawn { spec, disk_url });
            }
        }
    }

    /// Kills every VMM: the lease may be gone, so the controller may start them elsewhere.
    fn fence(&mut self) {
        if !self.fenced {
            self.self_fences += 1;
        }
        self.fenced = true;
        let names: Vec<String> = self.vms.keys().cloned().collect();
        for vm in names {
            self.outbox.push(Action::Kill { vm: vm.clone() });
            if let Some(v) = self.vms.remove(&vm) {
                for (generation, id) in v.migrating.into_iter().chain(v.receiving) {
                    let reply = CommandReply::Failed {
                        error: "the host fenced itself (its etcd lease could not be renewed)"
                            .into(),
                    };
                    self.reply(generation, id, reply);
                }
            }
        }
    }

    fn reply(&mut self, generation: u64, id: u64, reply: CommandReply) {
        self.replies.insert((generation, id), reply.clone());
        self.reply_order.push_back((generation, id));
        while self.reply_order.len() > REPLIES_KEPT {
            if let Some(old) = self.reply_order.pop_front() {
                self.replies.remove(&old);
            }
        }
        self.outbox.push(Action::Reply {
            generation,
            id,
            seq: self.seq,
            reply,
        });
    }

    fn command(&mut self, cmd: Command, now: u64) {
        let Command {
            generation,
            id,
            host_lease: cmd_lease,
            body,
        } = cmd;
        if generation < self.highest_generation {
            let reply = CommandReply::StaleGeneration {
                seen: self.highest_generation,
            };
            self.outbox.push(Action::Reply {
                generation,
                id,
                seq: self.seq,
                reply,
            });
            return;
        }
        if generation > self.highest_generation {
            self.highest_generation = generation;
            self.last_command_id = 0;
        }
        self.last_command_id = self.last_command_id.max(id);
        // The same command again while it is still under way (a retried request): its one answer
        // comes when it ends.
        let under_way = self.vms.values().any(|v| {
            v.migrating == Some((generation, id)) || v.receiving == Some((generation, id))
        });
        if under_way {
            return;
        }
        if let Some(r) = self.replies.get(&(generation, id)) {
            let reply = r.clone();
            self.outbox.push(Action::Reply {
                generation,
                id,
                seq: self.seq,
                reply,
            });
            return;
        }
        if cmd_lease != self.lease.unwrap_or(0) {
            let reply = CommandReply::Failed {
                error: format!(
                    "sent to this host's registration {cmd_lease}; it registered again since"
                ),
            };
            self.reply(generation, id, reply);
            return;
        }
        if self.fenced || self.renewed_sent_ms.is_none() || self.past_deadline(now) {
            let reply = CommandReply::Failed {
                error: "this host holds no live etcd lease".into(),
            };
            self.reply(generation, id, reply);
            return;
        }
        match body {
            CommandBody::Start { spec, disk_url } => {
                let name = spec.name.clone();
                if let Some(v) = self.vms.get(&name)
                    && !matches!(v.state, ObservedState::Exited)
                {
                    let reply = CommandReply::Failed {
                        error: format!("VM {name} is already here ({:?})", v.state),
                    };
                    self.reply(generation, id, reply);
                    return;
                }
                self.vms.insert(
                    name,
                    Supervised {
                        spec: spec.clone(),
                        disk_url: disk_url.clone(),
                        state: ObservedState::Starting,
                        stopping: false,
                        migrating: None,
                        receiving: None,
                        restarts: VecDeque::new(),
                        restart_at_ms: None,
                        receive_deadline_ms: None,
                    },
                );
                self.outbox.push(Action::Spawn { spec, disk_url });
                let reply = CommandReply::Done {
                    listen: None,
                    report: None,
                    vm_state: Some(ObservedState::Starting),
                };
                self.reply(generation, id, reply);
            }
            CommandBody::Stop { vm } => {
                match self.vms.get_mut(&vm) {
                    Some(v) if v.state != ObservedState::Exited => {
                        v.stopping = true;
                        v.restart_at_ms = None;
                        self.outbox.push(Action::Kill { vm: vm.clone() });
                    }
                    Some(_) => {
                        self.vms.remove(&vm);
                    }
                    None => {}
                }
                let reply = CommandReply::Done {
                    listen: None,
                    report: None,
                    vm_state: None,
                };
                self.reply(generation, id, reply);
            }
            CommandBody::Receive { spec, disk_url } => {
                let name = spec.name.clone();
                if let Some(v) = self.vms.get(&name)
                    && v.state != ObservedState::Exited
                {
                    let reply = CommandReply::Failed {
                        error: format!("VM {name} is already here ({:?})", v.state),
                    };
                    self.reply(generation, id, reply);
                    return;
                }
                self.vms.insert(
                    name,
                    Supervised {
                        spec: spec.clone(),
                        disk_url: disk_url.clone(),
                        state: ObservedState::Receiving,
                        stopping: false,
                        migrating: None,
                        receiving: Some((generation, id)),
                        restarts: VecDeque::new(),
                        restart_at_ms: None,
                        receive_deadline_ms: Some(now + self.cfg.receive_timeout_ms),
                    },
                );
                self.outbox.push(Action::SpawnReceiver { spec, disk_url });
            }
            CommandBody::MigrateOut {
                vm,
                to,
                disk_successor,
                post_copy_after,
            } => match self.vms.get_mut(&vm) {
                Some(v) if v.state == ObservedState::Running && v.migrating.is_none() => {
                    v.migrating = Some((generation, id));
                    self.outbox.push(Action::Migrate {
                        vm,
                        to,
                        disk_successor,
                        post_copy_after,
                    });
                }
                other => {
                    let state = other.map_or(ObservedState::Absent, |v| v.state);
                    let reply = CommandReply::Failed {
                        error: format!("VM {vm} is not running here ({state:?})"),
                    };
                    self.reply(generation, id, reply);
                }
            },
            CommandBody::Resume { vm } => {
                let reply = match self.vms.get_mut(&vm) {
                    Some(v) if v.state == ObservedState::Paused => {
                        v.state = ObservedState::Running;
                        self.outbox.push(Action::Resume { vm });
                        CommandReply::Done {
                            listen: None,
                            report: None,
                            vm_state: Some(ObservedState::Running),
                        }
                    }
                    other => CommandReply::Failed {
                        error: format!(
                            "VM {vm} is not paused here ({:?})",
                            other.map_or(ObservedState::Absent, |v| v.state)
                        ),
                    },
                };
                self.reply(generation, id, reply);
            }
            CommandBody::Ping => {
                let reply = CommandReply::Done {
                    listen: None,
                    report: None,
                    vm_state: None,
                };
                self.reply(generation, id, reply);
            }
            CommandBody::Query { vm } => {
                let reply = CommandReply::Done {
                    listen: None,
                    report: None,
                    vm_state: Some(self.state_of(&vm)),
                };
                self.reply(generation, id, reply);
            }
        }
    }

    fn exited(&mut self, vm: &str, status: &str, now: u64) {
        let Some(v) = self.vms.get_mut(vm) else {
            return;
        };
        if v.stopping {
            self.vms.remove(vm);
            return;
        }
        if let Some((generation, id)) = v.receiving.take() {
            self.vms.remove(vm);
            let reply = CommandReply::Failed {
                error: format!("the receiver exited: {status}"),
            };
            self.reply(generation, id, reply);
            return;
        }
        if v.state == ObservedState::Receiving || v.state == ObservedState::Paused {
            // A receiver that never ran the VM, or a paused migration source: not restarted.
            v.state = ObservedState::Exited;
            return;
        }
        while v
            .restarts
            .front()
            .is_some_and(|t| now.saturating_sub(*t) > self.cfg.restart_window_ms)
        {
            v.restarts.pop_front();
        }
        if v.migrating.is_none() && (v.restarts.len() as u32) < self.cfg.restart_limit {
            let backoff = self.cfg.restart_backoff_ms << v.restarts.len().min(16);
            v.state = ObservedState::Exited;
            v.restart_at_ms = Some(now + backoff);
        } else {
            v.state = ObservedState::Exited;
        }
    }

    fn migration_ended(
        &mut self,
        vm: &str,
        outcome: MigrationOutcome,
        report: Option<serde_json::Value>,
    ) {
        let Some(v) = self.vms.get_mut(vm) else {
            return;
        };
        let Some((generation, id)) = v.migrating.take() else {
            return;
        };
        let reply = match outcome {
            MigrationOutcome::Completed => {
                self.vms.remove(vm);
                CommandReply::Done {
                    listen: None,
                    report,
                    vm_state: Some(ObservedState::Absent),
                }
            }
            MigrationOutcome::Failed => CommandReply::Failed {
                error: "the migration failed; the VM still runs here".into(),
            },
            MigrationOutcome::InDoubt => {
                v.state = ObservedState::Paused;
                CommandReply::InDoubt {
                    error: "the target did not confirm the commit; the VM is paused here".into(),
                }
            }
            MigrationOutcome::Lost => {
                // The paused copy refuses to run (its memory is stale): it is killed at once and
                // reported exited from this answer on, so no later report shows a paused copy
                // that a controller could try to resume.
                v.state = ObservedState::Exited;
                v.stopping = true;
                v.restart_at_ms = None;
                self.outbox.push(Action::Kill { vm: vm.to_string() });
                CommandReply::Lost {
                    error: "post-copy failed after the switch; the target stopped the VM and \
                            its stale paused copy here was killed"
                        .into(),
                }
            }
        };
        self.reply(generation, id, reply);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str) -> VmCreate {
        VmCreate {
            name: name.into(),
            vcpus: 1,
            memory_mib: 64,
            kernel: "builtin:testguest".into(),
            cmdline: String::new(),
            disk: None,
            host: None,
            anti_affinity: None,
            restart_priority: 50,
        }
    }

    fn start(generation: u64, id: u64, name: &str) -> Input {
        Input::Command(Command {
            generation,
            id,
            host_lease: 1,
            body: CommandBody::Start {
                spec: spec(name),
                disk_url: None,
            },
        })
    }

    fn leased() -> Agent {
        let mut a = Agent::new(Config::default());
        a.step(
            Input::LeaseRenewed {
                sent_ms: 0,
                lease: 1,
            },
            0,
        );
        a
    }

    #[test]
    fn a_vm_counts_as_migrating_from_the_command_until_the_migration_ends() {
        let mut a = leased();
        a.step(start(1, 1, "m"), 10);
        a.step(Input::VmmRunning { vm: "m".into() }, 20);
        assert!(!a.is_migrating("m"));
        let out = |id| {
            Input::Command(Command {
                generation: 1,
                id,
                host_lease: 1,
                body: CommandBody::MigrateOut {
                    vm: "m".into(),
                    to: "10.0.0.2:7000".into(),
                    disk_successor: None,
                    post_copy_after: None,
                },
            })
        };
        a.step(out(2), 30);
        assert!(
            a.is_migrating("m"),
            "its VMM would refuse a dirty-rate sample"
        );
        a.step(
            Input::MigrationEnded {
                vm: "m".into(),
                outcome: MigrationOutcome::Failed,
                report: None,
            },
            40,
        );
        assert!(
            !a.is_migrating("m"),
            "a failed migration leaves it running here"
        );
        assert_eq!(a.state_of("m"), ObservedState::Running);
        assert!(!a.is_migrating("nope"));
    }

    #[test]
    fn a_post_copy_loss_is_answered_as_lost_and_the_paused_copy_is_not_restarted() {
        let mut a = leased();
        a.step(start(1, 1, "m"), 10);
        a.step(Input::VmmRunning { vm: "m".into() }, 20);
        a.step(
            Input::Command(Command {
                generation: 1,
                id: 2,
                host_lease: 1,
                body: CommandBody::MigrateOut {
                    vm: "m".into(),
                    to: "10.0.0.2:7000".into(),
                    disk_successor: None,
                    post_copy_after: Some(2),
                },
            }),
            30,
        );
        // The rounds asked for reach the migration the shell starts.
        assert!(
            a.drain_actions().iter().any(|x| matches!(
                x,
                Action::Migrate {
                    post_copy_after: Some(2),
                    ..
                }
            )),
            "post_copy_after must reach the migration"
        );
        a.step(
            Input::MigrationEnded {
                vm: "m".into(),
                outcome: MigrationOutcome::Lost,
                report: None,
            },
            40,
        );
        let acts = a.drain_actions();
        assert!(
            matches!(
                acts.as_slice(),
                [
                    Action::Kill { vm },
                    Action::Reply {
                        generation: 1,
                        id: 2,
                        reply: CommandReply::Lost { .. },
                        ..
                    }
                ] if vm == "m"
            ),
            "the stale copy is killed, then the answer given: {acts:?}"
        );
        assert_eq!(
            a.state_of("m"),
            ObservedState::Exited,
            "never reported paused again"
        );
        assert!(!a.is_migrating("m"));
        // Its VMM exits: the stale copy is never started again here.
        a.step(
            Input::VmmExited {
                vm: "m".into(),
                status: "exit status: 1".into(),
            },
            50,
        );
        // Well past the restart back-off (500 ms), with the lease kept.
        for now in [600, 1_200, 2_400] {
            let lease = Input::LeaseRenewed {
                sent_ms: now,
                lease: 1,
            };
            a.step(lease, now);
            a.step(Input::Tick, now);
        }
        assert!(
            !a.drain_actions()
                .iter()
                .any(|x| matches!(x, Action::Spawn { .. })),
            "a lost VM's paused copy must not be restarted"
        );
        assert_eq!(
            a.state_of("m"),
            ObservedState::Absent,
            "gone once its VMM exited"
        );
    }

    #[test]
    fn a_command_from_an_older_generation_is_refused_and_changes_nothing() {
        let mut a = leased();
        a.step(start(5, 1, "a"), 10);
        a.drain_actions();
        a.step(start(4, 1, "b"), 20);
        let acts = a.drain_actions();
        assert_eq!(
            acts,
            vec![Action::Reply {
                generation: 4,
                id: 1,
                seq: 3,
                reply: CommandReply::StaleGeneration { seen: 5 }
            }]
        );
        assert_eq!(a.state_of("b"), ObservedState::Absent);
    }

    #[test]
    fn the_agent_kills_its_vmms_before_its_lease_can_expire() {
        let mut a = leased();
        a.step(start(1, 1, "a"), 10);
        a.step(Input::VmmRunning { vm: "a".into() }, 20);
        a.drain_actions();
        // TTL 5000, margin 2000: the deadline is 3000 after the last successful send.
        a.step(Input::Tick, 2_999);
        assert!(a.drain_actions().is_empty());
        a.step(Input::Tick, 3_000);
        assert_eq!(a.drain_actions(), vec![Action::Kill { vm: "a".into() }]);
        assert!(a.is_fenced());
        // While fenced, commands are refused.
        a.step(start(1, 2, "b"), 3_100);
        assert!(matches!(
            a.drain_actions().as_slice(),
            [Action::Reply {
                reply: CommandReply::Failed { .. },
                ..
            }]
        ));
    }

    #[test]
    fn a_crashed_vm_restarts_with_back_off_until_its_budget_is_spent() {
        let mut a = leased();
        let mut now = 0;
        a.step(start(1, 1, "a"), now);
        a.drain_actions();
        let mut restarts = 0;
        for _ in 0..5 {
            now += 100;
            a.step(
                Input::LeaseRenewed {
                    sent_ms: now,
                    lease: 1,
                },
                now,
            );
            a.step(Input::VmmRunning { vm: "a".into() }, now);
            a.step(
                Input::VmmExited {
                    vm: "a".into(),
                    status: "signal 9".into(),
                },
                now,
            );
            // Keep the lease and let the back-off pass.
            for _ in 0..10 {
                now += 500;
                a.step(
                    Input::LeaseRenewed {
                        sent_ms: now,
                        lease: 1,
                    },
                    now,
                );
            }
            restarts += a
                .drain_actions()
                .iter()
                .filter(|x| matches!(x, Action::Spawn { .. }))
                .count();
        }
        assert_eq!(restarts, 3, "restart_limit is 3 within the window");
        assert_eq!(a.state_of("a"), ObservedState::Exited);
    }

    #[test]
    fn a_command_repeated_while_under_way_gets_its_one_answer_when_it_ends() {
        let mut a = leased();
        let receive = |id| {
            Input::Command(Command {
                generation: 1,
                id,
                host_lease: 1,
                body: CommandBody::Receive {
                    spec: spec("a"),
                    disk_url: None,
                },
            })
        };
        a.step(receive(3), 0);
        assert_eq!(a.drain_actions().len(), 1, "the receiver is started");
        a.step(receive(3), 1);
        assert!(
            a.drain_actions().is_empty(),
            "no second receiver, no early answer"
        );
        a.step(
            Input::ReceiverListening {
                vm: "a".into(),
                listen: "10.0.0.1:7000".into(),
            },
            2,
        );
        let acts = a.drain_actions();
        assert!(
            matches!(
                acts.as_slice(),
                [Action::Reply {
                    id: 3,
                    reply: CommandReply::Done {
                        listen: Some(_),
                        ..
                    },
                    ..
                }]
            ),
            "{acts:?}"
        );
    }

    #[test]
    fn a_repeated_command_id_is_answered_again_not_redone() {
        let mut a = leased();
        a.step(start(1, 7, "a"), 0);
        let first = a.drain_actions();
        a.step(start(1, 7, "a"), 1);
        let second = a.drain_actions();
        assert_eq!(first.len(), 2, "{first:?}");
        assert_eq!(second.len(), 1, "only the reply: {second:?}");
        let reply_of = |a: Option<&Action>| match a {
            Some(Action::Reply { id, reply, .. }) => Some((*id, reply.clone())),
            _ => None,
        };
        assert!(reply_of(first.last()).is_some());
        assert_eq!(reply_of(first.last()), reply_of(second.last()));
    }
}

//! The agent protocol: what the leading controller tells a host's agent, what the agent answers and
//! reports, and the host record it keeps in etcd.
//!
//! ```text
//!  agent                         etcd                          controller (leader, generation G)
//!    │ put /tern/hosts/NAME (lease, TTL) ─▶│                                │
//!    │ keep-alive every TTL/3 ───────────▶ │ ◀──── watch /tern/hosts/ ──────│
//!    │ ◀──────────── Command { generation: G, id, body } ───────────────────│
//!    │ ─────────── CommandReply (Done / Failed / StaleGeneration) ─────────▶│
//!    │ ─────────── AgentReport (every interval: VMs seen, telemetry) ──────▶│
//! ```
//!
//! **Fencing token.** Every command carries the controller's generation (the revision of its etcd
//! election key). An agent remembers the highest generation it has seen and refuses any command with
//! a lower one, so a deposed leader that wakes up late cannot act.
//!
//! **Self-fencing.** An agent that cannot renew its etcd lease before `TTL − margin` kills its VMMs;
//! the controller restarts them elsewhere only after the lease expired plus that margin.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::cluster::{HostCapacity, VmCreate};

/// The etcd key prefix of host records.
pub const HOSTS_PREFIX: &str = "/tern/hosts/";

/// What an agent keeps under `/tern/hosts/NAME`, bound to its lease.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HostRecord {
    /// The host's name.
    pub name: String,
    /// Where the agent takes commands (`http://ADDR:PORT`).
    pub agent_url: String,
    /// What the host offers.
    pub capacity: HostCapacity,
    /// The etcd lease the record is bound to: a new one each time the agent registers again
    /// (after a restart or a self-fence).
    pub lease: u64,
}

/// A command from the leading controller.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Command {
    /// The sender's generation (fencing token).
    pub generation: u64,
    /// The command's id, unique per generation; a repeated id is answered again, not re-done.
    pub id: u64,
    /// The host registration (etcd lease) the controller addressed: an agent that registered
    /// again since refuses the command, so nothing sent to its earlier life acts late.
    pub host_lease: u64,
    /// What to do.
    pub body: CommandBody,
}

/// What a command asks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum CommandBody {
    /// Start a VM here (a `tern vm run` child). `disk_url` is the disk as the VMM opens it.
    Start {
        /// The VM.
        spec: VmCreate,
        /// The disk, `volume://NODE/FILE`, if any.
        disk_url: Option<String>,
    },
    /// Stop a VM here.
    Stop {
        /// The VM's name.
        vm: String,
    },
    /// Get ready to receive a VM: start `tern vm receive` and answer with its address.
    Receive {
        /// The VM.
        spec: VmCreate,
        /// The disk, if any.
        disk_url: Option<String>,
    },
    /// Move a VM that runs here to a target that is ready to receive it.
    MigrateOut {
        /// The VM's name.
        vm: String,
        /// The target's migration listener, `ADDR:PORT`.
        to: String,
        /// The volume node id that takes over the disk's write lease.
        disk_successor: Option<u32>,
        /// Switch to post-copy after this many pre-copy rounds (absent: pre-copy only).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        post_copy_after: Option<u32>,
    },
    /// Resume a VM paused here (a migration source whose move did not happen).
    Resume {
        /// The VM's name.
        vm: String,
    },
    /// Nothing to do: a new leader's first word, so the agent learns its generation (and refuses
    /// the older ones) before the leader trusts its reports.
    Ping,
    /// Say whether a VM runs here (settles a migration in doubt).
    Query {
        /// The VM's name.
        vm: String,
    },
}

/// The body of an agent's answer: the reply and the agent's event counter when it gave it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CommandResponse {
    /// The agent's event counter (see [`AgentReport::seq`]).
    pub seq: u64,
    /// The answer.
    pub reply: CommandReply,
}

/// An agent's answer to a command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "result", rename_all = "snake_case", deny_unknown_fields)]
pub enum CommandReply {
    /// Done as asked.
    Done {
        /// For `receive`: the listener's address.
        listen: Option<String>,
        /// For `migrate_out`: the migration report (JSON), if the VMM gave one.
        report: Option<serde_json::Value>,
        /// For `query`: what the agent sees of the VM.
        vm_state: Option<ObservedState>,
    },
    /// Not done; nothing changed (or, for `migrate_out`, the VM still runs here).
    Failed {
        /// Why.
        error: String,
    },
    /// A migration's commit had no answer: the VM is paused here and may run on the target.
    InDoubt {
        /// Why.
        error: String,
    },
    /// A `migrate_out` in post-copy failed after the switch (`tern vm migrate` exit 4, outcome
    /// `failed_post_copy`): the target stopped the guest, and the paused copy here, which
    /// refuses to run (its memory is stale), has been killed. The VM runs nowhere; nothing is in
    /// doubt.
    Lost {
        /// Why.
        error: String,
    },
    /// The command's generation is below one this agent has seen: refused, nothing done.
    StaleGeneration {
        /// The highest generation the agent has seen.
        seen: u64,
    },
}

/// What an agent sees of a VM it supervises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ObservedState {
    /// The VMM process is starting.
    Starting,
    /// Running.
    Running,
    /// Paused (e.g. a migration source after its final pause).
    Paused,
    /// Receiving a migration (not yet running).
    Receiving,
    /// The VMM exited.
    Exited,
    /// The agent knows no such VM.
    Absent,
}

/// One VM in an [`AgentReport`]. Telemetry only grows: unknown fields are ignored (see
/// [`AgentReport`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ObservedVm {
    /// The VM's name.
    pub name: String,
    /// What the agent sees.
    pub state: ObservedState,
    /// vCPU utilisation over the last interval (0..1 of the VM's vCPUs), if measured.
    pub cpu_utilization: Option<f64>,
    /// Resident memory of the VMM, MiB, if measured.
    pub rss_mib: Option<u64>,
    /// Resident guest RAM, KiB, if measured: the guest pages it ever touched (the VMM's guest
    /// memory mappings' resident set), which bounds what a migration's first pass sends. Absent
    /// from agents older than this field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_resident_kib: Option<u64>,
    /// Resident guest RAM that is not zero, KiB, if measured: estimated by reading a sample of
    /// the resident pages, taken with the dirty-rate sample. What a migration's first pass sends
    /// (it skips zero pages); the resident figure counts a whole 2 MiB for every transparent
    /// huge page the guest touched. Absent from agents older than this field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_nonzero_kib: Option<u64>,
    /// Guest pages (4 KiB) dirtied per second at the last sample, if measured: the VMM's dirty
    /// log over a short window, taken every few intervals (absent while the VM migrates, and
    /// from agents older than this field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirty_pages_per_sec: Option<f64>,
}

/// Sent by each agent to the leading controller every telemetry interval (never stored in etcd).
///
/// **Compatibility.** Unlike commands and replies, a report (and each [`ObservedVm`] in it)
/// ignores fields it does not know, and every field added after the first version is an
/// `Option` that is left out when `None` and read as `None` when missing. So a newer agent's
/// report is taken by an older controller (which ignores the telemetry it cannot use, instead of
/// refusing the report and losing the host), and an older agent's report by a newer one. Fields
/// that change what a command does never go here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AgentReport {
    /// The host.
    pub host: String,
    /// The highest controller generation the agent has seen.
    pub generation_seen: u64,
    /// The agent's event counter when it took this report (it rises with every input the agent
    /// handles; replies carry it too, so a report older than a reply is recognised as such).
    pub seq: u64,
    /// The highest command id of that generation the agent had handled when it took this report:
    /// the controller trusts what the report says is absent only once it covers every command it
    /// sent about that VM.
    pub last_command_id: u64,
    /// The VMs it supervises.
    pub vms: Vec<ObservedVm>,
    /// Host CPU utilisation over the last interval (0..1), if measured.
    pub cpu_utilization: Option<f64>,
    /// Cores the core-parking policy has parked on this host, if it runs (`tern agent
    /// --parking report|on`), at most the host's declared cores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parked_cores: Option<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_round_trip_with_a_tagged_body() {
        let c = Command {
            generation: 7,
            id: 3,
            host_lease: 1,
            body: CommandBody::MigrateOut {
                vm: "a".into(),
                to: "10.77.0.12:7000".into(),
                disk_successor: Some(2),
                post_copy_after: None,
            },
        };
        let json = serde_json::to_string(&c).unwrap();
        assert!(json.contains(r#""op":"migrate_out""#), "{json}");
        // Pre-copy only: the field is left out, so an agent that predates it takes the command.
        assert!(!json.contains("post_copy_after"), "{json}");
        assert_eq!(serde_json::from_str::<Command>(&json).unwrap(), c);
        let mut post_copy = c.clone();
        if let CommandBody::MigrateOut {
            post_copy_after, ..
        } = &mut post_copy.body
        {
            *post_copy_after = Some(2);
        }
        let json = serde_json::to_string(&post_copy).unwrap();
        assert!(json.contains(r#""post_copy_after":2"#), "{json}");
        assert_eq!(serde_json::from_str::<Command>(&json).unwrap(), post_copy);
    }

    #[test]
    fn reports_take_unknown_fields_and_leave_out_absent_telemetry() {
        // An older agent's report: no dirty rate, no parked cores.
        let old = r#"{"host":"h1","generation_seen":3,"seq":9,"last_command_id":2,
            "vms":[{"name":"a","state":"running","cpu_utilization":0.5,"rss_mib":70}],
            "cpu_utilization":0.25}"#;
        let r: AgentReport = serde_json::from_str(old).unwrap();
        assert_eq!(r.parked_cores, None);
        assert_eq!(r.vms[0].dirty_pages_per_sec, None);
        assert_eq!(r.vms[0].guest_resident_kib, None);
        assert_eq!(r.vms[0].guest_nonzero_kib, None);
        let json = serde_json::to_string(&r).unwrap();
        assert!(
            !json.contains("parked_cores")
                && !json.contains("dirty_pages_per_sec")
                && !json.contains("guest_resident_kib")
                && !json.contains("guest_nonzero_kib"),
            "absent telemetry is left out, so an older controller reads it: {json}"
        );
        // A newer agent's report, with a field this version does not know.
        let newer = old
            .replace(
                r#""rss_mib":70"#,
                r#""rss_mib":70,"dirty_pages_per_sec":812.5,"guest_nonzero_kib":240,"x":1"#,
            )
            .replace(
                r#""cpu_utilization":0.25"#,
                r#""cpu_utilization":0.25,"parked_cores":1,"y":[2]"#,
            );
        let r: AgentReport = serde_json::from_str(&newer).unwrap();
        assert_eq!(r.parked_cores, Some(1));
        assert_eq!(r.vms[0].dirty_pages_per_sec, Some(812.5));
        assert_eq!(r.vms[0].guest_nonzero_kib, Some(240));
        // Commands still refuse what they do not know.
        let cmd = r#"{"generation":1,"id":1,"host_lease":1,"body":{"op":"ping"},"x":1}"#;
        assert!(serde_json::from_str::<Command>(cmd).is_err());
    }

    #[test]
    fn a_reply_without_its_required_field_is_refused() {
        assert!(serde_json::from_str::<CommandReply>(r#"{"result":"stale_generation"}"#).is_err());
        assert!(serde_json::from_str::<CommandReply>(r#"{"result":"failed"}"#).is_err());
        let r: CommandReply =
            serde_json::from_str(r#"{"result":"stale_generation","seen":9}"#).unwrap();
        assert_eq!(r, CommandReply::StaleGeneration { seen: 9 });
    }
}

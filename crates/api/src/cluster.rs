//! The cluster REST API's bodies (`/v1/...` on the controller): hosts, VMs, tasks, events, errors.
//!
//! Every VM in a reply carries `name`, `host` and `state`; every error is an [`ErrorBody`]. Inputs
//! are checked by [`VmCreate::validate`] before anything is created, so a bad request changes
//! nothing.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Most vCPUs a cluster VM may have.
pub const MAX_VCPUS: u32 = 64;
/// Least guest memory, MiB.
pub const MIN_MEMORY_MIB: u64 = 16;
/// Most guest memory, MiB (1 TiB).
pub const MAX_MEMORY_MIB: u64 = 1 << 20;
/// Highest restart priority (restarted first after a host failure).
pub const MAX_RESTART_PRIORITY: u32 = 100;
/// Longest kernel command line, bytes.
pub const MAX_CMDLINE_BYTES: usize = 2048;

/// An error reply: what went wrong (`error`, a short stable phrase) and the specifics (`detail`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// A short, stable description such as `unknown VM` or `no host fits`.
    pub error: String,
    /// The specifics: the value that was wrong and what is allowed.
    pub detail: String,
}

/// Whether a host is in service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    /// Its agent holds its etcd lease: it runs VMs and takes new ones (unless in maintenance).
    Up,
    /// Its lease expired; its VMs are restarted elsewhere once the self-fencing deadline has passed
    /// and its disk leases are fenced.
    Lost,
    /// Lost, and its disk write leases have been fenced: none of its old VMs can write any more.
    Fenced,
}

/// What a host offers, as its agent registers it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HostCapacity {
    /// Physical cores the host gives to VMs.
    pub cores: u32,
    /// Memory the host gives to VMs, MiB.
    pub memory_mib: u64,
    /// The SPECpower model used for the host's energy (a name `tern sim` knows).
    pub power_model: String,
    /// The host's volume node (`ADDR:PORT`), if it serves the shared volume.
    pub volume_node: Option<String>,
    /// The host's volume node id, if any (the successor of a disk lease moving here).
    pub volume_node_id: Option<u32>,
}

/// A host, as `GET /v1/hosts` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HostInfo {
    /// The host's name (its agent's `--host-id`).
    pub name: String,
    /// In service, lost or fenced.
    pub state: HostState,
    /// In maintenance: takes no new VMs, and its VMs have been (or are being) moved away.
    pub maintenance: bool,
    /// What it offers.
    pub capacity: HostCapacity,
    /// The agent's command URL.
    pub agent_url: String,
    /// The VMs placed on it.
    pub vms: Vec<String>,
    /// vCPUs of the VMs placed on it.
    pub vcpus_used: u32,
    /// Memory of the VMs placed on it, MiB.
    pub memory_mib_used: u64,
    /// Host CPU utilisation at the last telemetry sample (0..1), if any arrived.
    pub cpu_utilization: Option<f64>,
    /// Power state (`on` when a reply from an older controller leaves it out).
    #[serde(default)]
    pub power: crate::automation::HostPower,
    /// Cores the host's parking policy has parked at the last report, if it reported any.
    #[serde(default)]
    pub parked_cores: Option<u32>,
}

/// A VM's lifecycle state as the controller sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Accepted, waiting for a host or for its host to start it.
    Pending,
    /// Its host was told to start it.
    Starting,
    /// Its host reports it running.
    Running,
    /// Being moved live to another host.
    Migrating,
    /// Stopped on request.
    Stopped,
    /// Could not be started (and will not be retried until asked), or lost with no host to run on.
    Failed,
}

/// `POST /v1/vms`: a VM to create.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmCreate {
    /// Name: 1–63 characters of `a-z`, `0-9` and `-`, starting with a letter or digit.
    pub name: String,
    /// Virtual CPUs (1–64).
    pub vcpus: u32,
    /// Guest memory, MiB (16 – 1048576).
    pub memory_mib: u64,
    /// The kernel: `builtin:testguest` or a path on every host.
    pub kernel: String,
    /// The kernel command line.
    #[serde(default)]
    pub cmdline: String,
    /// A file on the shared volume used as the VM's disk (`vm1.raw`).
    #[serde(default)]
    pub disk: Option<String>,
    /// Pin the VM to this host (it never runs elsewhere).
    #[serde(default)]
    pub host: Option<String>,
    /// VMs with the same anti-affinity group never share a host.
    #[serde(default)]
    pub anti_affinity: Option<String>,
    /// Restart order after a host failure: higher first (0–100, default 50).
    #[serde(default = "default_priority")]
    pub restart_priority: u32,
}

fn default_priority() -> u32 {
    50
}

/// Why a [`VmCreate`] (or a name) is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidInput {
    /// A name breaks the naming rule.
    #[error(
        "invalid {what} name {name:?}: use 1-63 characters of a-z, 0-9 and '-', starting with a letter or digit"
    )]
    Name {
        /// Which kind of name.
        what: &'static str,
        /// The name given.
        name: String,
    },
    /// A number outside its range.
    #[error("{field} = {value} is out of range: allowed {min}..={max}")]
    Range {
        /// The field.
        field: &'static str,
        /// The value given.
        value: u64,
        /// The least allowed.
        min: u64,
        /// The most allowed.
        max: u64,
    },
    /// The kernel is neither builtin nor an absolute path.
    #[error("kernel {0:?} must be `builtin:testguest` or an absolute path")]
    Kernel(String),
    /// The command line is too long or holds a control character.
    #[error("cmdline must be at most {MAX_CMDLINE_BYTES} bytes of printable text")]
    Cmdline,
}

/// Checks a host, VM, group or volume file name: 1–63 of `a-z0-9-` (file names may also hold `.`
/// and `_`), not starting with `-` or `.`.
pub fn validate_name(what: &'static str, name: &str) -> Result<(), InvalidInput> {
    let file = what == "disk";
    let ok_char = |c: char| {
        c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || (file && (c == '.' || c == '_'))
    };
    let first_ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if name.is_empty() || name.len() > 63 || !first_ok || !name.chars().all(ok_char) {
        return Err(InvalidInput::Name {
            what,
            name: name.to_string(),
        });
    }
    Ok(())
}

fn range(field: &'static str, value: u64, min: u64, max: u64) -> Result<(), InvalidInput> {
    if value < min || value > max {
        return Err(InvalidInput::Range {
            field,
            value,
            min,
            max,
        });
    }
    Ok(())
}

impl VmCreate {
    /// Checks every field; the first problem found is returned.
    pub fn validate(&self) -> Result<(), InvalidInput> {
        validate_name("VM", &self.name)?;
        range("vcpus", u64::from(self.vcpus), 1, u64::from(MAX_VCPUS))?;
        range(
            "memory_mib",
            self.memory_mib,
            MIN_MEMORY_MIB,
            MAX_MEMORY_MIB,
        )?;
        range(
            "restart_priority",
            u64::from(self.restart_priority),
            0,
            u64::from(MAX_RESTART_PRIORITY),
        )?;
        if self.kernel != "builtin:testguest" && !self.kernel.starts_with('/') {
            return Err(InvalidInput::Kernel(self.kernel.clone()));
        }
        if self.cmdline.len() > MAX_CMDLINE_BYTES || self.cmdline.chars().any(char::is_control) {
            return Err(InvalidInput::Cmdline);
        }
        if let Some(d) = &self.disk {
            validate_name("disk", d)?;
        }
        if let Some(h) = &self.host {
            validate_name("host", h)?;
        }
        if let Some(g) = &self.anti_affinity {
            validate_name("anti-affinity group", g)?;
        }
        Ok(())
    }
}

/// A VM, as `GET /v1/vms` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VmInfo {
    /// The VM's name.
    pub name: String,
    /// Where it runs (or is placed to run); `null` while no host fits.
    pub host: Option<String>,
    /// Its lifecycle state.
    pub state: VmState,
    /// What it was created with.
    pub spec: VmCreate,
    /// How often it was restarted after a host failure or a crash.
    pub restarts: u32,
    /// Why it last failed, if it did.
    pub last_error: Option<String>,
}

/// `POST /v1/vms/{name}/migrate`: move a VM live; `to: null` lets the controller choose.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// The target host, or `null`.
    #[serde(default)]
    pub to: Option<String>,
    /// Switch to post-copy after this many pre-copy rounds (1..=1000); absent: pre-copy only.
    /// After the switch the VM's memory is split across both hosts: a lost link loses it, and
    /// the cluster restarts it from its disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 1000)]
    pub post_copy_after: Option<u32>,
}

/// The rounds `post_copy_after` accepts (those of `tern vm migrate --post-copy-after`).
pub const POST_COPY_AFTER_RANGE: std::ops::RangeInclusive<u32> = 1..=1000;

impl MigrateRequest {
    /// Checks the target's name and `post_copy_after`'s range.
    pub fn validate(&self) -> Result<(), InvalidInput> {
        if let Some(to) = &self.to {
            validate_name("host", to)?;
        }
        if let Some(n) = self.post_copy_after
            && !POST_COPY_AFTER_RANGE.contains(&n)
        {
            return Err(InvalidInput::Range {
                field: "post_copy_after",
                value: u64::from(n),
                min: u64::from(*POST_COPY_AFTER_RANGE.start()),
                max: u64::from(*POST_COPY_AFTER_RANGE.end()),
            });
        }
        Ok(())
    }
}

/// `POST /v1/hosts/{name}/maintenance`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MaintenanceRequest {
    /// `true` to enter maintenance (empties the host live), `false` to leave it.
    pub enter: bool,
}

/// What a task does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    /// A live migration.
    Migrate,
    /// Emptying a host for maintenance.
    Maintenance,
}

/// Where a task stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Waiting for a migration slot.
    Queued,
    /// Under way.
    Running,
    /// Done as asked.
    Succeeded,
    /// Not done; the VM still runs where it was.
    Failed,
}

/// A task, as `GET /v1/tasks/{id}` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TaskInfo {
    /// Its id.
    pub id: u64,
    /// What it does.
    pub kind: TaskKind,
    /// The VM moved (migrations).
    pub vm: Option<String>,
    /// The host moved from, or put into maintenance.
    pub from: Option<String>,
    /// The host moved to.
    pub to: Option<String>,
    /// Where it stands.
    pub state: TaskState,
    /// When it was accepted, ms on the controller's clock.
    pub created_ms: u64,
    /// When it ended, if it has.
    pub finished_ms: Option<u64>,
    /// Why it failed.
    pub error: Option<String>,
    /// The migration report as the source's VMM gave it (JSON), if any.
    pub report: Option<serde_json::Value>,
    /// Where a migration's time went, phase by phase (absent for maintenance tasks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phases: Option<TaskPhases>,
}

/// Where a migration task's time went, ms on the controller's clock: each phase from the
/// controller's sending of a command to its handling of the agent's answer, so the agents'
/// round trips are in them. A phase not reached (yet) is absent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TaskPhases {
    /// Accepted → the target asked to receive (waiting for a migration slot).
    pub queued_ms: Option<u64>,
    /// `receive` sent → the target's answer that its receiver listens: the target VMM's start
    /// in receive mode (with its disk opened) and the agent's round trip.
    pub target_start_ms: Option<u64>,
    /// `migrate_out` sent → the source's answer: the migration itself (its report's
    /// `total_ms`: connection, rounds, the pause with the disk's hand-over, the target's
    /// resume) and the agent's round trip.
    pub migrate_ms: Option<u64>,
}

impl TaskPhases {
    /// The move's whole time, ms: the target's start and the migration (`None` until both
    /// are known). The time a task waited for a slot is not part of it.
    pub fn move_ms(&self) -> Option<u64> {
        Some(self.target_start_ms? + self.migrate_ms?)
    }
}

/// `GET /v1/tasks/{id}` and `GET /v1/tasks`: a task, and for a migration its predicted cost (the
/// migration policy's model, when the controller made one) and its measured cost (from the source
/// VMM's report, once it succeeded). The two extra fields are absent elsewhere, so a [`TaskInfo`]
/// reader parses this too.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TaskDetail {
    /// The task.
    #[serde(flatten)]
    pub task: TaskInfo,
    /// A migration's predicted cost, if one was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicted: Option<crate::automation::MigrationPrediction>,
    /// A migration's measured cost, once it succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actual: Option<crate::automation::MigrationActual>,
}

/// `202 Accepted` for a started task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TaskRef {
    /// The task's id (`GET /v1/tasks/{id}`).
    pub task: u64,
}

/// Something that happened, as `GET /v1/events` lists it (oldest first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct EventInfo {
    /// Sequence number, rising.
    pub seq: u64,
    /// When, ms on the controller's clock.
    pub at_ms: u64,
    /// A stable kind: `vm_placed`, `vm_running`, `host_lost`, `leases_fenced`, ...
    pub kind: String,
    /// The VM concerned.
    pub vm: Option<String>,
    /// The host concerned.
    pub host: Option<String>,
    /// A sentence for people.
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm() -> VmCreate {
        VmCreate {
            name: "web-1".into(),
            vcpus: 1,
            memory_mib: 64,
            kernel: "builtin:testguest".into(),
            cmdline: "tern.hb_ms=500".into(),
            disk: Some("web-1.raw".into()),
            host: None,
            anti_affinity: None,
            restart_priority: 50,
        }
    }

    #[test]
    fn a_good_request_validates() {
        assert_eq!(vm().validate(), Ok(()));
    }

    #[test]
    fn a_migrate_request_names_post_copy_after_and_its_range() {
        let req = |n| MigrateRequest {
            to: Some("h2".into()),
            post_copy_after: n,
        };
        for n in [None, Some(1), Some(2), Some(1000)] {
            assert_eq!(req(n).validate(), Ok(()), "{n:?}");
        }
        for n in [0, 1001, u32::MAX] {
            assert_eq!(
                req(Some(n)).validate().unwrap_err().to_string(),
                format!("post_copy_after = {n} is out of range: allowed 1..=1000")
            );
        }
        let bad_host = MigrateRequest {
            to: Some("H_2".into()),
            post_copy_after: None,
        };
        assert!(matches!(
            bad_host.validate(),
            Err(InvalidInput::Name { .. })
        ));
        // The field is optional on the wire, absent when not asked, and nothing else is taken.
        let none: MigrateRequest = serde_json::from_str(r#"{"to":null}"#).unwrap();
        assert_eq!(none, MigrateRequest::default());
        assert_eq!(serde_json::to_string(&none).unwrap(), r#"{"to":null}"#);
        let two: MigrateRequest =
            serde_json::from_str(r#"{"to":"h2","post_copy_after":2}"#).unwrap();
        assert_eq!(two, req(Some(2)));
        assert!(serde_json::from_str::<MigrateRequest>(r#"{"post_copy":2}"#).is_err());
    }

    #[test]
    fn each_bad_field_is_named_with_its_range() {
        let mut v = vm();
        v.name = "Web_1".into();
        assert!(
            v.validate()
                .unwrap_err()
                .to_string()
                .contains("invalid VM name")
        );
        let mut v = vm();
        v.vcpus = 0;
        assert_eq!(
            v.validate().unwrap_err().to_string(),
            "vcpus = 0 is out of range: allowed 1..=64"
        );
        let mut v = vm();
        v.memory_mib = 1 << 40;
        assert!(v.validate().unwrap_err().to_string().contains("memory_mib"));
        let mut v = vm();
        v.restart_priority = 101;
        assert!(v.validate().unwrap_err().to_string().contains("0..=100"));
        let mut v = vm();
        v.kernel = "vmlinux".into();
        assert!(matches!(v.validate(), Err(InvalidInput::Kernel(_))));
        let mut v = vm();
        v.cmdline = "a\nb".into();
        assert_eq!(v.validate(), Err(InvalidInput::Cmdline));
        let mut v = vm();
        v.disk = Some("../etc/passwd".into());
        assert!(v.validate().is_err());
    }

    #[test]
    fn names_follow_the_rule() {
        for ok in ["a", "web-1", "0x", &"a".repeat(63)] {
            assert_eq!(validate_name("VM", ok), Ok(()), "{ok}");
        }
        for bad in ["", "-a", "A", "a_b", "a.b", &"a".repeat(64), "é"] {
            assert!(validate_name("VM", bad).is_err(), "{bad}");
        }
        assert_eq!(validate_name("disk", "vm1.raw"), Ok(()));
        assert!(validate_name("disk", ".hidden").is_err());
    }

    #[test]
    fn unknown_fields_and_wrong_types_are_refused() {
        let bad =
            r#"{"name":"a","vcpus":1,"memory_mib":64,"kernel":"builtin:testguest","colour":"red"}"#;
        assert!(serde_json::from_str::<VmCreate>(bad).is_err());
        let bad = r#"{"name":"a","vcpus":"one","memory_mib":64,"kernel":"builtin:testguest"}"#;
        assert!(serde_json::from_str::<VmCreate>(bad).is_err());
        let ok = r#"{"name":"a","vcpus":1,"memory_mib":64,"kernel":"builtin:testguest"}"#;
        let v: VmCreate = serde_json::from_str(ok).unwrap();
        assert_eq!(v.restart_priority, 50);
        assert_eq!(v.cmdline, "");
    }

    #[test]
    fn states_serialise_in_snake_case() {
        let s: Vec<String> = [
            VmState::Pending,
            VmState::Starting,
            VmState::Running,
            VmState::Migrating,
            VmState::Stopped,
            VmState::Failed,
        ]
        .iter()
        .map(|s| serde_json::to_string(s).unwrap())
        .collect();
        assert_eq!(
            s.join(","),
            r#""pending","starting","running","migrating","stopped","failed""#
        );
    }
}

//! What the shell feeds the loop: one snapshot of every host and VM, as the agents last reported
//! them and the controller places them.

/// One host at the time of the snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct HostSample {
    /// The host's name.
    pub name: String,
    /// Physical cores it gives to VMs.
    pub cores: u32,
    /// Its power model: `hp-ml110-g4`, `hp-ml110-g5`, `ibm-x3250-x3470`, `ibm-x3550-x5670` or the
    /// SPECpower names of those (see [`crate::energy::HostPowerSpec::by_name`]).
    pub power_model: String,
    /// Its agent holds its lease (it runs and reports).
    pub up: bool,
    /// In maintenance: takes no VMs, and the loop leaves it and its VMs alone.
    pub maintenance: bool,
    /// Host CPU utilisation measured by its agent (0..1), if reported.
    pub cpu_utilization: Option<f64>,
    /// Cores its parking policy has parked, if reported.
    pub parked_cores: Option<u32>,
    /// Measured bandwidth of live migrations into this host, bytes/s: the shell's estimate from
    /// the migrations it has seen land here ([`crate::cost::LinkEstimator`]). `None`:
    /// [`crate::LoopConfig::link_bytes_per_sec`].
    pub migration_link_bytes_per_sec: Option<f64>,
}

/// One VM at the time of the snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct VmSample {
    /// The VM's name.
    pub name: String,
    /// Where it runs (or is placed); `None` while it has no host.
    pub host: Option<String>,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Guest memory, MiB.
    pub memory_mib: u64,
    /// Resident memory, MiB, if reported: the agent's figure is the VMM process's RSS, which
    /// holds every guest page ever touched plus the VMM's own pages. A migration's full copy sends
    /// only touched, non-zero guest pages, so this is an upper bound of what it sends (clamped
    /// to `memory_mib`). `None`: all of the guest's memory is assumed sent.
    pub resident_mib: Option<u64>,
    /// CPU utilisation measured over its vCPUs (0..1), if reported.
    pub cpu_utilization: Option<f64>,
    /// Pages it dirties per second, if measured (the migration cost model's input).
    pub dirty_pages_per_sec: Option<f64>,
    /// Its disks on the shared volume: each one's write lease is handed over in a move's pause
    /// (the migration cost model's `volume_disks`).
    pub volume_disks: u32,
    /// Pinned to its host: never moved.
    pub pinned: bool,
    /// VMs of one anti-affinity group never share a host.
    pub anti_affinity: Option<String>,
    /// Being moved right now (by anyone): not moved again until it lands.
    pub migrating: bool,
}

/// A snapshot of the cluster.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Telemetry {
    /// Every host the controller knows.
    pub hosts: Vec<HostSample>,
    /// Every VM the controller knows.
    pub vms: Vec<VmSample>,
}

/// Why a snapshot was refused (nothing of it is taken).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TelemetryError {
    /// A host's power model is not one the loop can value.
    #[error("host {host}: unknown power model {name:?} (known: {known})")]
    UnknownPowerModel {
        /// The host.
        host: String,
        /// The name given.
        name: String,
        /// The names known.
        known: String,
    },
    /// A host or VM name appears twice.
    #[error("{what} {name} appears twice in one snapshot")]
    Duplicate {
        /// `host` or `VM`.
        what: &'static str,
        /// The name.
        name: String,
    },
    /// A VM names a host the snapshot does not hold.
    #[error("VM {vm} is on host {host}, which the snapshot does not list")]
    UnknownHost {
        /// The VM.
        vm: String,
        /// The host it names.
        host: String,
    },
    /// A number outside its range (a utilisation outside 0..=1, no cores, no vCPUs, ...).
    #[error("{what} {name}: {field} = {value} is out of range: allowed {min}..={max}")]
    Range {
        /// `host` or `VM`.
        what: &'static str,
        /// Its name.
        name: String,
        /// The field.
        field: &'static str,
        /// The value given.
        value: f64,
        /// The least allowed.
        min: f64,
        /// The most allowed.
        max: f64,
    },
}

fn range(
    what: &'static str,
    name: &str,
    field: &'static str,
    value: f64,
    min: f64,
    max: f64,
) -> Result<(), TelemetryError> {
    if !(min <= value && value <= max) {
        return Err(TelemetryError::Range {
            what,
            name: name.to_string(),
            field,
            value,
            min,
            max,
        });
    }
    Ok(())
}

impl Telemetry {
    /// Checks names, references and ranges (power models are checked by the loop).
    pub fn validate(&self) -> Result<(), TelemetryError> {
        let mut hosts = std::collections::BTreeSet::new();
        for h in &self.hosts {
            if !hosts.insert(h.name.as_str()) {
                return Err(TelemetryError::Duplicate {
                    what: "host",
                    name: h.name.clone(),
                });
            }
            range("host", &h.name, "cores", f64::from(h.cores), 1.0, 4096.0)?;
            if let Some(u) = h.cpu_utilization {
                range("host", &h.name, "cpu_utilization", u, 0.0, 1.0)?;
            }
            if let Some(b) = h.migration_link_bytes_per_sec {
                range(
                    "host",
                    &h.name,
                    "migration_link_bytes_per_sec",
                    b,
                    1.0,
                    1e12,
                )?;
            }
            if let Some(p) = h.parked_cores {
                range(
                    "host",
                    &h.name,
                    "parked_cores",
                    f64::from(p),
                    0.0,
                    f64::from(h.cores),
                )?;
            }
        }
        let mut vms = std::collections::BTreeSet::new();
        for v in &self.vms {
            if !vms.insert(v.name.as_str()) {
                return Err(TelemetryError::Duplicate {
                    what: "VM",
                    name: v.name.clone(),
                });
            }
            range("VM", &v.name, "vcpus", f64::from(v.vcpus), 1.0, 4096.0)?;
            if let Some(u) = v.cpu_utilization {
                range("VM", &v.name, "cpu_utilization", u, 0.0, 1.0)?;
            }
            if let Some(d) = v.dirty_pages_per_sec {
                range("VM", &v.name, "dirty_pages_per_sec", d, 0.0, 1e12)?;
            }
            if let Some(h) = &v.host
                && !hosts.contains(h.as_str())
            {
                return Err(TelemetryError::UnknownHost {
                    vm: v.name.clone(),
                    host: h.clone(),
                });
            }
        }
        Ok(())
    }
}

//! Where the desired state lives: etcd (every write a transaction guarded by this controller's
//! leader key), or an in-process map with the same keys (tests and `Shell::in_memory`).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp};
use tern_api::agent::{HOSTS_PREFIX, HostRecord};

use crate::core::VmRecord;

/// The etcd key of a VM's desired state.
pub const VMS_PREFIX: &str = "/tern/desired/vms/";
/// The etcd key prefix of the hosts in maintenance (value `1`).
pub const MAINTENANCE_PREFIX: &str = "/tern/desired/maintenance/";
/// The election name; the leader key's value is the leader's URL.
pub const ELECTION: &str = "/tern/leader";

/// How long one etcd call may take.
pub const ETCD_TIMEOUT: Duration = Duration::from_secs(3);

/// What a new leader reads.
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    /// `/tern/desired/vms/*`.
    pub desired: Vec<VmRecord>,
    /// `/tern/desired/maintenance/*`.
    pub maintenance: Vec<String>,
    /// `/tern/hosts/*`.
    pub hosts: Vec<HostRecord>,
    /// The etcd revision of the read (the hosts watch starts after it); 0 in memory.
    pub revision: i64,
}

/// Why a write was not done.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The leader key is gone or was re-created: another controller leads.
    #[error("the leader key {key:?} no longer has revision {generation}: deposed")]
    Deposed {
        /// The leader key.
        key: String,
        /// This controller's generation.
        generation: i64,
    },
    /// This controller holds no leader key.
    #[error("not leading: no leader key to guard the write")]
    NotLeading,
    /// etcd did not answer or refused.
    #[error("etcd: {0}")]
    Etcd(String),
    /// A write failure injected in memory (tests).
    #[error("the store refused the write (injected)")]
    Injected,
}

/// The desired-state store.
pub enum Store {
    /// Real etcd.
    Etcd {
        /// A connected client (cloned per call).
        client: Box<etcd_client::Client>,
        /// The leader key and its create revision (the generation) while leading.
        guard: Mutex<Option<(Vec<u8>, i64)>>,
    },
    /// An in-process map with etcd's keys.
    Memory {
        /// Key → value.
        kv: Mutex<BTreeMap<String, Vec<u8>>>,
        /// Refuse every write (to test that nothing is half-created).
        fail_writes: AtomicBool,
    },
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Store::Etcd { guard, .. } => f
                .debug_struct("Store::Etcd")
                .field("guard", &*lock(guard))
                .finish_non_exhaustive(),
            Store::Memory { kv, fail_writes } => f
                .debug_struct("Store::Memory")
                .field("keys", &lock(kv).len())
                .field("fail_writes", fail_writes)
                .finish(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn etcd_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Etcd(e.to_string())
}

impl Store {
    /// An empty in-memory store.
    pub fn memory() -> Store {
        Store::Memory {
            kv: Mutex::new(BTreeMap::new()),
            fail_writes: AtomicBool::new(false),
        }
    }

    /// In memory: refuse (or accept again) every guarded write.
    pub fn set_fail_writes(&self, on: bool) {
        if let Store::Memory { fail_writes, .. } = self {
            fail_writes.store(on, Ordering::SeqCst);
        }
    }

    /// Records the leader key whose create revision guards every write (`None`: not leading).
    pub fn set_guard(&self, g: Option<(Vec<u8>, i64)>) {
        if let Store::Etcd { guard, .. } = self {
            *lock(guard) = g;
        }
    }

    /// Writes `value` under `key` (or deletes it), only if this controller's leader key still
    /// has the generation's revision.
    pub async fn put_guarded(&self, key: &str, value: Option<Vec<u8>>) -> Result<(), StoreError> {
        match self {
            Store::Memory { kv, fail_writes } => {
                if fail_writes.load(Ordering::SeqCst) {
                    return Err(StoreError::Injected);
                }
                let mut kv = lock(kv);
                match value {
                    Some(v) => kv.insert(key.to_string(), v),
                    None => kv.remove(key),
                };
                Ok(())
            }
            Store::Etcd { client, guard } => {
                let (leader, generation) = lock(guard).clone().ok_or(StoreError::NotLeading)?;
                let op = match value {
                    Some(v) => TxnOp::put(key, v, None),
                    None => TxnOp::delete(key, None),
                };
                let txn = Txn::new()
                    .when([Compare::create_revision(
                        leader.clone(),
                        CompareOp::Equal,
                        generation,
                    )])
                    .and_then([op]);
                let mut c = (**client).clone();
                let resp = tokio::time::timeout(ETCD_TIMEOUT, c.txn(txn))
                    .await
                    .map_err(|_| StoreError::Etcd(format!("no answer in {ETCD_TIMEOUT:?}")))?
                    .map_err(etcd_err)?;
                if !resp.succeeded() {
                    return Err(StoreError::Deposed {
                        key: String::from_utf8_lossy(&leader).into_owned(),
                        generation,
                    });
                }
                Ok(())
            }
        }
    }

    /// The value under `key`, if any (unguarded: a read).
    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let (kvs, _) = self.prefix(key).await?;
        Ok(kvs.into_iter().find(|(k, _)| k.is_empty()).map(|(_, v)| v))
    }

    /// Everything under `prefix`: key (without the prefix) → value (unguarded: a read).
    pub async fn get_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        Ok(self.prefix(prefix).await?.0)
    }

    /// Stores a VM's desired state (or deletes it).
    pub async fn store_vm(&self, name: &str, record: Option<&VmRecord>) -> Result<(), StoreError> {
        let value = record.map(|r| serde_json::to_vec(r).expect("a VmRecord serialises"));
        self.put_guarded(&format!("{VMS_PREFIX}{name}"), value)
            .await
    }

    /// Stores a host's maintenance flag.
    pub async fn store_maintenance(&self, host: &str, on: bool) -> Result<(), StoreError> {
        let key = format!("{MAINTENANCE_PREFIX}{host}");
        self.put_guarded(&key, on.then(|| b"1".to_vec())).await
    }

    /// In memory: registers (or removes) a host record as an agent would.
    pub fn put_host(&self, record: Option<&HostRecord>, name: &str) {
        if let Store::Memory { kv, .. } = self {
            let key = format!("{HOSTS_PREFIX}{name}");
            let mut kv = lock(kv);
            match record {
                Some(r) => kv.insert(key, serde_json::to_vec(r).expect("serialises")),
                None => kv.remove(&key),
            };
        }
    }

    /// Everything under `prefix`, key (without the prefix) → value.
    async fn prefix(&self, prefix: &str) -> Result<(Vec<(String, Vec<u8>)>, i64), StoreError> {
        match self {
            Store::Memory { kv, .. } => Ok((
                lock(kv)
                    .iter()
                    .filter_map(|(k, v)| Some((k.strip_prefix(prefix)?.to_string(), v.clone())))
                    .collect(),
                0,
            )),
            Store::Etcd { client, .. } => {
                let mut c = (**client).clone();
                let resp = tokio::time::timeout(
                    ETCD_TIMEOUT,
                    c.get(prefix, Some(GetOptions::new().with_prefix())),
                )
                .await
                .map_err(|_| StoreError::Etcd(format!("no answer in {ETCD_TIMEOUT:?}")))?
                .map_err(etcd_err)?;
                let rev = resp.header().map_or(0, |h| h.revision());
                let kvs = resp
                    .kvs()
                    .iter()
                    .filter_map(|kv| {
                        let k = std::str::from_utf8(kv.key()).ok()?;
                        Some((k.strip_prefix(prefix)?.to_string(), kv.value().to_vec()))
                    })
                    .collect();
                Ok((kvs, rev))
            }
        }
    }

    /// Reads the desired state and the host records. A record that does not parse is skipped
    /// with a message on stderr (it cannot be acted on).
    pub async fn load(&self) -> Result<Loaded, StoreError> {
        let (vms, _) = self.prefix(VMS_PREFIX).await?;
        let (maint, _) = self.prefix(MAINTENANCE_PREFIX).await?;
        let (hosts, revision) = self.prefix(HOSTS_PREFIX).await?;
        let mut out = Loaded {
            revision,
            ..Loaded::default()
        };
        for (name, v) in vms {
            match serde_json::from_slice::<VmRecord>(&v) {
                Ok(r) => out.desired.push(r),
                Err(e) => eprintln!("tern controller: skipping {VMS_PREFIX}{name}: {e}"),
            }
        }
        out.maintenance = maint
            .into_iter()
            .filter(|(_, v)| v == b"1")
            .map(|(h, _)| h)
            .collect();
        for (name, v) in hosts {
            match serde_json::from_slice::<HostRecord>(&v) {
                Ok(r) => out.hosts.push(r),
                Err(e) => eprintln!("tern controller: skipping {HOSTS_PREFIX}{name}: {e}"),
            }
        }
        Ok(out)
    }
}

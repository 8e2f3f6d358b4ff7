//! The host's registration in etcd: a lease, the host record bound to it, keep-alives every
//! TTL/3, and what each keep-alive proves fed to the core; plus the leader's URL for reports.
//!
//! A keep-alive that gets no answer within TTL/6 is not a loss: the stream is opened again and
//! the same lease renewed, until etcd says the lease is gone (then [`Input::LeaseLost`] and a new
//! registration). Meanwhile the core fences on its own clock.

use std::time::Duration;

use etcd_client::{Client, GetOptions, PutOptions, SortOrder, SortTarget};
use tern_api::agent::{HOSTS_PREFIX, HostRecord};
use tokio::sync::mpsc;
use tokio::time::timeout;

use super::{Clock, Event};
use crate::core::Input;

/// The prefix of the controllers' election keys (the lowest create revision leads).
pub const LEADER_PREFIX: &str = "/tern/leader";

/// The pause before a keep-alive that got no answer is sent again.
const RETRY: Duration = Duration::from_millis(100);

/// Keeps the host registered for as long as the agent runs.
pub(crate) async fn keep_registered(
    mut client: Client,
    record: HostRecord,
    ttl_ms: u64,
    clock: Clock,
    events: mpsc::Sender<Event>,
    lease_id: std::sync::Arc<std::sync::atomic::AtomicI64>,
) {
    let period = Duration::from_millis((ttl_ms / 3).max(100));
    let ttl_s = ttl_ms.div_ceil(1000).max(1) as i64;
    // Logged when it changes, not on every try.
    let mut trouble = String::new();
    let mut log = |now: String| {
        if now != trouble {
            eprintln!("tern agent: {now}");
            trouble = now;
        }
    };
    loop {
        // Register: a new lease and the record bound to it.
        let sent = clock.now_ms();
        let granted = timeout(period, client.lease_grant(ttl_s, None)).await;
        let id = match granted {
            Ok(Ok(r)) => r.id(),
            Ok(Err(e)) => {
                log(format!("cannot get an etcd lease (retrying): {e}"));
                tokio::time::sleep(period).await;
                continue;
            }
            Err(_) => {
                log(format!(
                    "etcd did not grant a lease within {period:?} (retrying)"
                ));
                continue;
            }
        };
        let mut rec = record.clone();
        rec.lease = id as u64;
        let key = format!("{HOSTS_PREFIX}{}", rec.name);
        let value = serde_json::to_string(&rec).unwrap_or_default();
        let put = timeout(
            period,
            client.put(key, value, Some(PutOptions::new().with_lease(id))),
        )
        .await;
        if !matches!(put, Ok(Ok(_))) {
            log(format!(
                "cannot write the host record under lease {id:x}; registering again"
            ));
            let _ = timeout(period, client.lease_revoke(id)).await;
            tokio::time::sleep(period).await;
            continue;
        }
        lease_id.store(id, std::sync::atomic::Ordering::Relaxed);
        let _ = events
            .send(Event::Input(Input::LeaseRenewed {
                sent_ms: sent,
                lease: id as u64,
            }))
            .await;
        log(format!(
            "registered {} under lease {id:x} (TTL {ttl_s} s)",
            rec.name
        ));
        renew_until_lost(&mut client, id, period, &clock, &events).await;
        lease_id.store(0, std::sync::atomic::Ordering::Relaxed);
        let _ = events.send(Event::Input(Input::LeaseLost)).await;
        log(format!("lease {id:x} is gone; registering again"));
    }
}

/// Renews lease `id` every `period` until etcd says it is gone.
///
/// An answer must come within `period / 2`; if none does, the keep-alive is sent again on a new
/// stream right away, so that one lost answer still leaves a second try before the core's fence
/// deadline (`TTL − margin` after the last answered send).
async fn renew_until_lost(
    client: &mut Client,
    id: i64,
    period: Duration,
    clock: &Clock,
    events: &mpsc::Sender<Event>,
) {
    let answer_within = period / 2;
    let retry = || tokio::time::Instant::now() + RETRY;
    let mut next = tokio::time::Instant::now();
    'reopen: loop {
        tokio::time::sleep_until(next).await;
        next = tokio::time::Instant::now() + period;
        // Opening the stream sends a keep-alive and waits for its answer.
        let sent = clock.now_ms();
        let (mut keeper, mut stream) =
            match timeout(answer_within, client.lease_keep_alive(id)).await {
                Ok(Ok(pair)) => pair,
                Ok(Err(e)) if e.to_string().contains("lease not found") => return,
                _ => {
                    next = retry();
                    continue 'reopen;
                }
            };
        renewed(events, sent, id).await;
        loop {
            tokio::time::sleep_until(next).await;
            next = tokio::time::Instant::now() + period;
            let sent = clock.now_ms();
            if keeper.keep_alive().await.is_err() {
                next = retry();
                continue 'reopen;
            }
            match timeout(answer_within, stream.message()).await {
                Ok(Ok(Some(r))) if r.ttl() > 0 => renewed(events, sent, id).await,
                Ok(Ok(Some(_))) => return,
                Ok(Err(e)) if e.to_string().contains("lease not found") => return,
                // No answer in time, or the stream broke: send again on a new stream (late
                // answers on the old one could not be matched to their send times).
                _ => {
                    next = retry();
                    continue 'reopen;
                }
            }
        }
    }
}

async fn renewed(events: &mpsc::Sender<Event>, sent_ms: u64, id: i64) {
    let _ = events
        .send(Event::Input(Input::LeaseRenewed {
            sent_ms,
            lease: id as u64,
        }))
        .await;
}

/// The URL of the leading controller: the value of the election key with the lowest create
/// revision under [`LEADER_PREFIX`], as etcd's election API decides.
pub(crate) async fn leader_url(client: &mut Client) -> Option<String> {
    let opts = GetOptions::new()
        .with_prefix()
        .with_sort(SortTarget::Create, SortOrder::Ascend)
        .with_limit(1);
    let resp = timeout(
        Duration::from_secs(1),
        client.get(LEADER_PREFIX, Some(opts)),
    )
    .await
    .ok()?
    .ok()?;
    let kv = resp.kvs().first()?;
    kv.value_str()
        .ok()
        .map(|s| s.trim_end_matches('/').to_string())
}

//! What a controller learnt of moves survives its restart through etcd: one controller (a shell
//! on a real etcd) leads and stores a learnt move cost under `/tern/desired/automation/
//! move_cost` with its guarded write, as its cycle does after measured moves; it stops; a new
//! controller on the same etcd takes office with that overhead (the links come back with it).
//!
//! Needs etcd; fails loudly without it.

use std::time::{Duration, Instant};

use tern_automation::cost::{LinkEstimator, OverheadEstimator};
use tern_controller::core::Config;
use tern_controller::shell::automation::{MOVE_COST_KEY, StoredMoveCost};
use tern_controller::shell::{Shell, ShellConfig};
use tern_test_support::{Etcd, free_port};

fn config(etcd: &Etcd) -> ShellConfig {
    ShellConfig {
        etcd: vec![etcd.url.clone()],
        listen: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
        url: None,
        lease_ttl_ms: 2_000,
        core: Config::default(),
        tls_dir: None,
    }
}

#[tokio::test]
async fn a_restarted_controller_goes_on_from_the_move_cost_in_etcd() {
    let etcd = Etcd::start();
    let first = Shell::start_etcd(&config(&etcd)).await.unwrap();
    assert!(
        first.wait_leading(Duration::from_secs(15)).await.is_some(),
        "the first controller did not lead: {}",
        etcd.log()
    );
    // Six moves measured at about 0.4 s beyond the model, two links measured.
    let mut overhead = OverheadEstimator::default();
    for u in [0.05, 0.1, 0.1, 0.2, 0.05, 0.1] {
        overhead.observe(u, 0.4);
    }
    let mut links = LinkEstimator::default();
    links.observe("h1", 9e8);
    links.observe("h2", 4e8);
    let learnt = StoredMoveCost {
        overhead: overhead.state(),
        links: links.measured().clone(),
    };
    first
        .shared()
        .store()
        .put_guarded(MOVE_COST_KEY, Some(serde_json::to_vec(&learnt).unwrap()))
        .await
        .unwrap();
    first.stop().await;
    drop(first);

    let next = Shell::start_etcd(&config(&etcd)).await.unwrap();
    assert!(
        next.wait_leading(Duration::from_secs(15)).await.is_some(),
        "the next controller did not lead: {}",
        etcd.log()
    );
    // it reads the stored state as it takes office
    let start = Instant::now();
    let (estimate, n) = loop {
        let (estimate, n) = next.shared().automation().overhead();
        if n == 6 {
            break (estimate, n);
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the new leader did not take the stored move cost (samples {n})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!((estimate, n), (overhead.estimate(), 6));
    assert!((estimate.fixed_s - 0.4).abs() < 1e-9, "{estimate:?}");
    next.stop().await;
}

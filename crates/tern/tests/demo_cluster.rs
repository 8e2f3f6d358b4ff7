//! `tern demo cluster --json`, the README's main demo, end to end: a 4-host test cluster with IPMI
//! BMCs, 12 VMs following PlanetLab traces, the controller's loop in full automation. The loop
//! must drain hosts with live migrations and power them off through their BMCs (ipmitool against
//! ipmi_sim), power one back on when the demo raises the load, and lose no VM. The cluster runs
//! over TLS (the dashboard's line carries a token). Each power-off is timed in the report and
//! handed to the replay.
//!
//! Needs root, KVM, etcd, ipmi_sim and ipmitool; fails loudly without them. About 2 minutes.

use std::process::Command;

use tern_test_support::{require_kvm, require_tools};

#[test]
fn the_loop_packs_powers_hosts_off_and_wakes_one_as_load_rises_losing_no_vm() {
    require_kvm();
    require_tools(&["etcd", "ipmi_sim", "ipmitool"]);
    let out = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["demo", "cluster", "--json", "--samples", "36"])
        .output()
        .expect("run tern demo cluster");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "tern demo cluster failed:\n{stderr}");
    // Over TLS, the dashboard's line carries a token in the fragment.
    assert!(
        stderr.contains("dashboard: https://127.0.0.1:") && stderr.contains("/#token=tern_"),
        "{stderr}"
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("the report is not JSON ({e}):\n{stderr}"));
    let n = |k: &str| r[k].as_u64().unwrap_or_else(|| panic!("{k} missing: {r}"));
    assert_eq!((n("hosts"), n("vms")), (4, 12), "{r}");
    assert_eq!(n("vms_lost"), 0, "{r}\n{stderr}");
    assert!(n("migrations") >= 2, "the VMs were packed: {r}\n{stderr}");
    assert_eq!(n("migrations_failed"), 0, "{r}\n{stderr}");
    assert!(
        n("host_power_offs") >= 1,
        "a drained host was powered off: {r}\n{stderr}"
    );
    assert!(
        n("host_power_ons") >= 1,
        "a host was powered on as load rose: {r}\n{stderr}"
    );
    // fewer hosts on at some point than at the start, and more again after the raise
    let series: Vec<u64> = r["hosts_on_series"]
        .as_array()
        .expect("hosts_on_series")
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(series.len(), 36, "{r}");
    let low = series.iter().copied().min().unwrap();
    let low_at = series.iter().position(|&v| v == low).unwrap();
    assert!(low < 4, "no host ever off: {series:?}");
    assert!(
        series[low_at..].iter().any(|&v| v > low),
        "no host came back on after the low point: {series:?}"
    );
    assert!(r["energy_kwh"].as_f64().unwrap() > 0.0, "{r}");
    // each live power-off timed from its action to the outcome the loop was told (the soft-off
    // through the BMC: the power-off's task reports its driver's answer, not waiting for the
    // host's fence), and the replay's power-off given that time
    let offs: Vec<f64> = r["recorded"]["power_off_s"]
        .as_array()
        .expect("recorded.power_off_s")
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert!(!offs.is_empty(), "no power-off timed: {r}");
    assert!(offs.iter().all(|&s| s > 0.0 && s < 70.0), "{offs:?}");
    let plans = r["recorded"]["plan_times"].as_array().expect("plan_times");
    assert!(
        plans
            .iter()
            .any(|p| p["actions"].as_str().unwrap().contains("power_off")
                && p["applied_s"].is_f64()
                && p["finished_s"].as_f64() >= p["decided_s"].as_f64()),
        "{plans:?}"
    );
    let sim = &r["sim"];
    // the replay's power-off is the live ones' (upper) median in steps of the live run, by the
    // documented rule: a round runs half-way through its sample, so `d` seconds are
    // ceil(d / step − 1/2) steps, at least 1
    let step = r["recorded"]["step_s"].as_f64().expect("recorded.step_s");
    let mut sorted = offs.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    let want = (median / step - 0.5).ceil().max(1.0) as u64;
    assert_eq!(
        sim["power_off_samples"].as_u64(),
        Some(want),
        "live power-offs {offs:?} s at {step} s a step: {r}"
    );
    assert_eq!(sim["hosts_on_series"].as_array().unwrap().len(), 36, "{r}");
    assert!(sim["energy_kwh"].as_f64().unwrap() > 0.0, "{r}");
}

//! The automation loop end to end: `tern cluster up` (real etcd, network-namespace hosts, an
//! agent and a volume node per host, a controller), three test-guest VMs spread over the three
//! hosts at low load, and an eager policy in manual mode set through `tern cluster policy set`.
//! A plan to drain a host appears in `GET /v1/plans` and nothing moves; `tern cluster plan apply`
//! runs its migrations live (the guests' heartbeats go on from where they were, no reboot), the
//! drained host ends empty, and each migration task carries its predicted and measured cost. The
//! hosts have no power drivers: a power-off in the plan would fail naming that, after the moves.
//!
//! Needs root, KVM and etcd; fails loudly without them.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::cluster::{Lab, hb_seqs, http};
use common::tern;
use serde_json::{Value, json};
use tern_api::cluster::VmState;
use tern_test_support::wait_for;

/// `tern cluster ARGS --controller URL`: (exit status, stdout, stderr).
fn cli(lab: &Lab, args: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new(tern());
    cmd.arg("cluster")
        .args(args)
        .args(["--controller", &lab.info.controllers[0]]);
    // The cluster runs over TLS: the CLI as its admin.
    if let Some(dir) = &lab.info.tls_dir {
        cmd.env("TERN_TLS_DIR", dir);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn get(lab: &Lab, path: &str) -> Value {
    let (st, body) = lab.api("GET", path, None);
    assert_eq!(st, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// The migrations of a plan.
fn plan_moves(plan: &Value) -> Vec<Value> {
    plan["actions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["kind"] == "migrate")
        .cloned()
        .collect()
}

/// A proposed plan in `GET /v1/plans`, waiting up to `timeout` for one.
fn proposed_plan(lab: &Lab, timeout: Duration) -> Value {
    let start = Instant::now();
    loop {
        let plans = get(lab, "/v1/plans");
        if let Some(p) = plans
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["state"] == "proposed")
        {
            return p.clone();
        }
        assert!(
            start.elapsed() < timeout,
            "no plan proposed: {plans}\n{}",
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Plan `id` once its migrations are done and it is no longer applying, waiting up to 60 s.
fn carried_out(lab: &Lab, id: u64) -> Value {
    let start = Instant::now();
    loop {
        let p = get(lab, &format!("/v1/plans/{id}"));
        let moved = p["actions"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["kind"] == "migrate")
            .all(|a| a["status"] == "done");
        if moved && p["state"] != "applying" {
            return p;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "plan {id} not carried out: {p}\n{}",
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Placement packs; spreads the VMs one per host with operator migrations.
fn spread(lab: &Lab, names: &[&str], hosts: &[String]) {
    for (n, h) in names.iter().zip(hosts) {
        if lab.vm(n).unwrap().host.as_deref() == Some(h.as_str()) {
            continue;
        }
        let (st, body) = lab.api(
            "POST",
            &format!("/v1/vms/{n}/migrate"),
            Some(&json!({"to": h})),
        );
        assert_eq!(st, 202, "{body}");
        wait_for("the spreading move", Duration::from_secs(30), || {
            lab.vm(n).is_some_and(|v| {
                v.host.as_deref() == Some(h.as_str()) && v.state == VmState::Running
            })
        });
    }
}

/// The index of the controller that leads (by its `/metrics`), once exactly one does.
fn leader(lab: &Lab) -> usize {
    let leading = || -> Vec<usize> {
        (0..lab.info.controllers.len())
            .filter(|&i| {
                http(
                    lab.tls.as_ref(),
                    None,
                    &lab.info.controllers[i],
                    "GET",
                    "/metrics",
                    None,
                )
                .is_ok_and(|(st, m)| st == 200 && m.contains("\ntern_controller_leader 1\n"))
            })
            .collect()
    };
    let mut one = None;
    wait_for("one controller to lead", Duration::from_secs(30), || {
        let l = leading();
        one = l.first().copied().filter(|_| l.len() == 1);
        one.is_some()
    });
    one.unwrap()
}

#[test]
fn a_manual_plan_drains_a_host_live_once_applied() {
    let started = Instant::now();
    let lab = Lab::up("aut", 3, 1);
    let hosts: Vec<String> = lab.info.hosts.iter().map(|h| h.name.clone()).collect();
    let names = ["au-1", "au-2", "au-3"];
    for n in names {
        lab.create(n, None, None);
    }
    lab.wait_running(&names, Duration::from_secs(60));
    spread(&lab, &names, &hosts);
    let tasks_before = get(&lab, "/v1/tasks").as_array().unwrap().len();

    // An eager manual policy through the CLI; an out-of-range knob is refused naming its range.
    let (rc, _, err) = cli(&lab, &["policy", "set", "--aggressiveness", "9"]);
    assert_ne!(rc, 0);
    assert!(
        err.contains("aggressiveness = 9 is out of range: allowed 1..=5"),
        "{err}"
    );
    let (rc, out, err) = cli(
        &lab,
        &[
            "policy",
            "set",
            "--automation",
            "manual",
            "--aggressiveness",
            "5",
            "--interval-s",
            "2",
            "--hold-s",
            "0",
            "--cooldown-s",
            "0",
            "--min-improvement-pct",
            "0",
            "--power",
            "true",
            "--off-hold-s",
            "0",
            "--json",
        ],
    );
    assert_eq!(rc, 0, "{err}");
    let p: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (p["automation"].as_str(), p["aggressiveness"].as_u64()),
        (Some("manual"), Some(5))
    );

    // A plan to drain a host is proposed; nothing moves on its own. (Each round makes a fresh
    // plan that replaces the one before, so the newest proposed plan is the one to apply.)
    let newest_proposed = || proposed_plan(&lab, Duration::from_secs(20));
    let first = newest_proposed();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        get(&lab, "/v1/tasks").as_array().unwrap().len(),
        tasks_before,
        "manual mode moved a VM"
    );
    let (rc, out, _) = cli(&lab, &["plans"]);
    assert_eq!(rc, 0);
    assert!(out.contains("proposed"), "{out}");
    assert!(
        out.contains(&format!(
            "migrate {}",
            first["actions"][0]["vm"].as_str().unwrap_or("?")
        )),
        "{out}"
    );

    let mut attempts = 0;
    let (id, moves, seq_before) = loop {
        let plan = newest_proposed();
        let id = plan["id"].as_u64().unwrap();
        let moves = plan_moves(&plan);
        assert!(!moves.is_empty(), "{plan}");
        // Heartbeats before the apply, on the hosts to be drained. (A target's console file may
        // hold an earlier stay of the VM there: only what is written after its length counts.)
        let seq_before: Vec<(String, String, u64, usize)> = moves
            .iter()
            .map(|m| {
                let (vm, from) = (m["vm"].as_str().unwrap(), m["from"].as_str().unwrap());
                let last = *hb_seqs(&lab.console(from, vm)).last().expect("heartbeats");
                let seen = lab.console(m["to"].as_str().unwrap(), vm).len();
                (vm.to_string(), from.to_string(), last, seen)
            })
            .collect();
        let (rc, out, err) = cli(&lab, &["plan", "apply", &id.to_string()]);
        if rc == 0 {
            break (id, moves, seq_before);
        }
        // Replaced by the next round's plan between the read and the apply: take that one.
        attempts += 1;
        assert!(attempts < 5 && err.contains("is superseded"), "{out}{err}");
    };
    let drained: Vec<String> = moves
        .iter()
        .map(|m| m["from"].as_str().unwrap().to_string())
        .collect();

    // Its migrations run live; the drained hosts end empty.
    let done = carried_out(&lab, id);
    match done["state"].as_str() {
        Some("applied") => {}
        Some("failed") => assert!(
            done["detail"]
                .as_str()
                .unwrap_or("")
                .contains("no power driver for host"),
            "{done}"
        ),
        s => panic!("plan {id} ended {s:?}: {done}"),
    }
    for h in &drained {
        let host = lab.hosts().into_iter().find(|x| x.name == *h).unwrap();
        assert!(host.vms.is_empty(), "{h} not drained: {host:?}");
    }
    for (vm, from, last, seen) in &seq_before {
        let v = lab.vm(vm).unwrap();
        let to = v.host.clone().unwrap();
        assert_ne!(&to, from, "{v:?}");
        assert_eq!(v.restarts, 0, "{v:?}");
        let after = || {
            lab.console(&to, vm)
                .get(*seen..)
                .unwrap_or_default()
                .to_string()
        };
        wait_for("heartbeats on the target", Duration::from_secs(20), || {
            hb_seqs(&after()).len() >= 2
        });
        let target = after();
        assert!(
            !target.contains("TERN-GUEST up"),
            "{vm} booted again on {to}:\n{target}"
        );
        assert!(
            hb_seqs(&target)[0] > *last,
            "{vm}'s heartbeats did not go on: {target}"
        );
    }
    // Each of the plan's migration tasks has its predicted and measured cost.
    let tasks = get(&lab, "/v1/tasks");
    let new = &tasks.as_array().unwrap()[tasks_before..];
    assert_eq!(new.len(), moves.len(), "{tasks}");
    for t in new {
        let t = get(&lab, &format!("/v1/tasks/{}", t["id"]));
        assert_eq!(t["state"], "succeeded", "{t}");
        assert!(t["predicted"]["time_s"].as_f64().unwrap() > 0.0, "{t}");
        assert!(t["actual"]["time_s"].as_f64().unwrap() > 0.0, "{t}");
        assert!(t["actual"]["bytes"].as_u64().unwrap() > 0, "{t}");
        eprintln!(
            "task {}: {} predicted {:.2} s / {} B / pause {:.0} ms, measured {:.2} s / {} B / pause {:.0} ms",
            t["id"],
            t["vm"],
            t["predicted"]["time_s"].as_f64().unwrap(),
            t["predicted"]["bytes"],
            t["predicted"]["downtime_ms"].as_f64().unwrap_or(0.0),
            t["actual"]["time_s"].as_f64().unwrap(),
            t["actual"]["bytes"],
            t["actual"]["downtime_ms"].as_f64().unwrap_or(0.0),
        );
    }
    let metrics = lab.api("GET", "/metrics", None).1;
    assert!(
        metrics.contains("tern_automation_plans_proposed_total"),
        "{metrics}"
    );
    eprintln!("plan {id} ended {}: {}", done["state"], done["detail"]);
    eprintln!("cluster_automation took {:?}", started.elapsed());
}

/// Plans live in etcd: a plan proposed under one controller is listed by the next leader after
/// the first is SIGKILLed, and applying it there runs its migrations.
#[test]
fn a_proposed_plan_survives_the_leader_and_is_applied_on_the_next() {
    let lab = Lab::up("apf", 3, 2);
    let hosts: Vec<String> = lab.info.hosts.iter().map(|h| h.name.clone()).collect();
    let names = ["ap-1", "ap-2", "ap-3"];
    for n in names {
        lab.create(n, None, None);
    }
    lab.wait_running(&names, Duration::from_secs(60));
    spread(&lab, &names, &hosts);
    let first = leader(&lab);

    // An eager manual policy proposes a drain; then rounds an hour apart and a hold longer than
    // the test, so the proposal stands and the next leader's own first rounds (whose hold
    // timers start afresh) propose nothing over it.
    let mut policy = get(&lab, "/v1/policy");
    for (k, v) in [
        ("automation", json!("manual")),
        ("aggressiveness", json!(5)),
        ("interval_s", json!(2)),
        ("hold_s", json!(0)),
        ("cooldown_s", json!(0)),
        ("min_improvement_pct", json!(0)),
    ] {
        policy[k] = v;
    }
    let (st, body) = lab.api("PUT", "/v1/policy", Some(&policy));
    assert_eq!(st, 200, "{body}");
    let proposed = || proposed_plan(&lab, Duration::from_secs(30));
    proposed();
    policy["interval_s"] = json!(3600);
    policy["hold_s"] = json!(600);
    let (st, body) = lab.api("PUT", "/v1/policy", Some(&policy));
    assert_eq!(st, 200, "{body}");
    let plan = proposed();
    let id = plan["id"].as_u64().unwrap();
    let moves = plan_moves(&plan);
    assert!(!moves.is_empty(), "{plan}");

    // SIGKILL the leader; the other leads and lists the plan as it was.
    let pid = lab.state.controllers[first].pid;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let killed = Instant::now();
    let next = {
        let mut next = first;
        wait_for(
            "the other controller to lead",
            Duration::from_secs(30),
            || {
                next = leader(&lab);
                next != first
            },
        );
        next
    };
    eprintln!(
        "controller {next} leads {:.1} s after controller {first} was killed",
        killed.elapsed().as_secs_f64()
    );
    let listed = get(&lab, "/v1/plans");
    let p = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == id)
        .unwrap_or_else(|| panic!("plan {id} lost in the fail-over: {listed}"));
    assert_eq!(p["state"], "proposed", "{p}");
    assert_eq!(p["actions"], plan["actions"], "{p}");

    // Applied on the new leader: its migrations run, the drained hosts end empty.
    let (st, body) = lab.api("POST", &format!("/v1/plans/{id}/apply"), None);
    assert_eq!(st, 202, "{body}");
    let done = carried_out(&lab, id);
    // the hosts have no power drivers: a power-off after the moves fails naming that
    assert!(
        done["state"] == "applied"
            || done["detail"]
                .as_str()
                .is_some_and(|d| d.contains("no power driver for host")),
        "{done}"
    );
    for m in &moves {
        let (vm, from) = (m["vm"].as_str().unwrap(), m["from"].as_str().unwrap());
        let v = lab.vm(vm).unwrap();
        assert_eq!(v.host.as_deref(), m["to"].as_str(), "{v:?}");
        assert_eq!(v.restarts, 0, "{v:?}");
        let host = lab.hosts().into_iter().find(|x| x.name == from).unwrap();
        assert!(host.vms.is_empty(), "{from} not drained: {host:?}");
    }
}

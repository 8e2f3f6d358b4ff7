//! The vendored data: the trace archive as documented, and the power tables in the constants.

use std::path::PathBuf;

use tern_policy::{HP_ML110_G4, HP_ML110_G5, Model};
use tern_sim::{SimConfig, TraceOrder, TraceSet, Workload, simulate};

fn data() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../data")
}

#[test]
fn vendored_archive_holds_the_ten_days() {
    let set = TraceSet::open(&data().join("planetlab/traces.tar.xz")).expect("archive opens");
    let counts: Vec<(String, usize)> = set
        .days()
        .unwrap()
        .into_iter()
        .map(|d| {
            let n = set.load_day(&d, &TraceOrder::Sorted).unwrap().names.len();
            (d, n)
        })
        .collect();
    let expect = [
        ("20110303", 1052),
        ("20110306", 898),
        ("20110309", 1061),
        ("20110322", 1516),
        ("20110325", 1078),
        ("20110403", 1463),
        ("20110409", 1358),
        ("20110411", 1233),
        ("20110412", 1054),
        ("20110420", 1033),
    ];
    let expect: Vec<(String, usize)> = expect.iter().map(|(d, n)| (d.to_string(), *n)).collect();
    assert_eq!(counts, expect);
    // every order file lists exactly its day's files
    for (d, n) in &expect {
        let order = data().join(format!("planetlab/cloudsim-listfiles-order/{d}.txt"));
        assert_eq!(
            set.load_day(d, &TraceOrder::File(order))
                .unwrap()
                .names
                .len(),
            *n
        );
    }
}

#[test]
fn power_constants_match_the_vendored_specpower_table() {
    let csv = std::fs::read_to_string(data().join("power-models/specpower_cloudsim.csv")).unwrap();
    for model in [HP_ML110_G4, HP_ML110_G5] {
        let line = csv
            .lines()
            .find(|l| l.starts_with(model.name))
            .expect("model row");
        let watts: Vec<f64> = line
            .split(',')
            .skip(6)
            .map(|x| x.parse().unwrap())
            .collect();
        assert_eq!(watts, model.watts.to_vec(), "{}", model.name);
    }
}

#[test]
fn npa_is_exactly_2419_2_kwh_in_both_models() {
    for model in [Model::CloudSim, Model::Paper] {
        let w = Workload::benchmark("x", 800, vec![[10; 288]; 4], model);
        let r = simulate(
            &w,
            &SimConfig {
                policy: "npa".parse().unwrap(),
                model,
                seed: 0,
                timeline: false,
            },
        );
        assert_eq!(r.energy_kwh, 2419.2);
    }
}

#[test]
fn opening_one_day_reads_the_same_traces() {
    let path = data().join("planetlab/traces.tar.xz");
    let all = TraceSet::open(&path).unwrap();
    for day in ["20110303", "20110409"] {
        let one = TraceSet::open_day(&path, day).unwrap();
        let a = all.load_day(day, &TraceOrder::Sorted).unwrap();
        let b = one.load_day(day, &TraceOrder::Sorted).unwrap();
        assert_eq!((a.names, a.samples), (b.names, b.samples));
    }
}

#[test]
fn built_in_traces_equal_the_vendored_archive() {
    let file = TraceSet::open(&data().join("planetlab/traces.tar.xz")).unwrap();
    let built_in = TraceSet::bundled().unwrap();
    assert_eq!(built_in.days().unwrap(), file.days().unwrap());
    for day in ["20110303", "20110420"] {
        let a = file.load_day(day, &TraceOrder::CloudSim).unwrap();
        let b = TraceSet::bundled_day(day)
            .unwrap()
            .load_day(day, &TraceOrder::CloudSim)
            .unwrap();
        assert_eq!((a.names, a.samples), (b.names, b.samples));
    }
}

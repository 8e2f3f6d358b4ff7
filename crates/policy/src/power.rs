//! Host power models: SPECpower tables with linear interpolation between the 10 % load points.

/// Watts drawn at 0 %, 10 %, …, 100 % CPU load (eleven SPECpower_ssj2008 points).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PowerModel {
    /// Name of the server the table was measured on.
    pub name: &'static str,
    /// Watts at each tenth of full load.
    pub watts: [f64; 11],
}

/// HP ProLiant ML110 G4 (Xeon 3040, 2 × 1860 MHz), SPECpower result 2011q1/00342.
pub const HP_ML110_G4: PowerModel = PowerModel {
    name: "HpProLiantMl110G4Xeon3040",
    watts: [
        86.0, 89.4, 92.6, 96.0, 99.5, 102.0, 106.0, 108.0, 112.0, 114.0, 117.0,
    ],
};

/// HP ProLiant ML110 G5 (Xeon 3075, 2 × 2660 MHz), SPECpower result 2011q1/00339.
pub const HP_ML110_G5: PowerModel = PowerModel {
    name: "HpProLiantMl110G5Xeon3075",
    watts: [
        93.7, 97.0, 101.0, 105.0, 110.0, 116.0, 121.0, 125.0, 129.0, 133.0, 135.0,
    ],
};

/// MIPS of one core of the server a SPECpower model (by its [`PowerModel::name`]) was measured on,
/// as CloudSim rates its hosts: the core clock in MHz. `None` for a server not listed.
///
/// | model | cores × MHz |
/// |---|---|
/// | `HpProLiantMl110G4Xeon3040` | 2 × 1860 |
/// | `HpProLiantMl110G5Xeon3075` | 2 × 2660 |
/// | `IbmX3250XeonX3470` | 4 × 2933 |
/// | `IbmX3550XeonX5670` | 12 × 2933 |
pub fn core_mips(model_name: &str) -> Option<f64> {
    match model_name {
        "HpProLiantMl110G4Xeon3040" => Some(1860.0),
        "HpProLiantMl110G5Xeon3075" => Some(2660.0),
        "IbmX3250XeonX3470" | "IbmX3550XeonX5670" => Some(2933.0),
        _ => None,
    }
}

impl PowerModel {
    /// Power in watts at CPU utilisation `u` (0.0 ..= 1.0; values outside are clamped).
    ///
    /// Linear interpolation between the two neighbouring table points, computed in the same
    /// floating-point order as the reference simulator so that ties between hosts resolve alike.
    pub fn watts_at(&self, u: f64) -> f64 {
        let u = u.clamp(0.0, 1.0);
        // The reference formula special-cases `u % 0.1 == 0`. In 0..=1 that holds for exactly five
        // doubles (0, 0.1, 0.2, 0.4, 0.8: the multiples of 0.1 that are representable), so test
        // those instead of calling the slow fmod.
        if u == 0.0 || u == 0.1 || u == 0.2 || u == 0.4 || u == 0.8 {
            return self.watts[(u * 10.0) as usize];
        }
        // u·10 ≥ 0, so truncation is floor, and ceil is floor + 1 unless u·10 is whole
        let x = u * 10.0;
        let lo = x as usize;
        let hi = if x == lo as f64 { lo } else { lo + 1 };
        let p_lo = self.watts[lo];
        let p_hi = self.watts[hi.min(10)];
        let delta = (p_hi - p_lo) / 10.0;
        p_lo + delta * (u - lo as f64 / 10.0) * 100.0
    }

    /// Power at full load.
    pub fn max_watts(&self) -> f64 {
        self.watts[10]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use expect_test::expect;

    #[test]
    fn specpower_interpolation_matches_hand_computed_points() {
        let mut out = String::new();
        for u in [0.0, 0.05, 0.1, 0.25, 0.5, 0.55, 0.99, 1.0] {
            out += &format!(
                "u={u:<4} g4={:.3} g5={:.3}\n",
                HP_ML110_G4.watts_at(u),
                HP_ML110_G5.watts_at(u)
            );
        }
        // 5 %: halfway between 86 and 89.4 → 87.7; 25 %: halfway 92.6..96 → 94.3; 55 %: 104 / 118.5.
        expect![[r#"
            u=0    g4=86.000 g5=93.700
            u=0.05 g4=87.700 g5=95.350
            u=0.1  g4=89.400 g5=97.000
            u=0.25 g4=94.300 g5=103.000
            u=0.5  g4=102.000 g5=116.000
            u=0.55 g4=104.000 g5=118.500
            u=0.99 g4=116.700 g5=134.800
            u=1    g4=117.000 g5=135.000
        "#]]
        .assert_eq(&out);
    }

    #[test]
    fn exact_grid_shortcut_agrees_with_fmod() {
        for i in 0..=100_000 {
            let u = i as f64 / 100_000.0;
            let by_fmod = u % 0.1 == 0.0;
            let listed = u == 0.0 || u == 0.1 || u == 0.2 || u == 0.4 || u == 0.8;
            assert_eq!(by_fmod, listed, "{u}");
        }
    }

    #[test]
    fn core_mips_are_the_servers_clocks() {
        assert_eq!(core_mips(HP_ML110_G4.name), Some(1860.0));
        assert_eq!(core_mips(HP_ML110_G5.name), Some(2660.0));
        assert_eq!(core_mips("hp-ml110-g5"), None);
    }

    #[test]
    fn out_of_range_utilisation_is_clamped() {
        assert_eq!(HP_ML110_G4.watts_at(-0.5), 86.0);
        assert_eq!(HP_ML110_G5.watts_at(1.7), 135.0);
    }
}

//! Learning-rate schedules: linear warmup, then constant, linear or cosine decay to a floor.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decay {
    Constant,
    Linear,
    Cosine,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LrSchedule {
    pub decay: Decay,
    pub peak: f64,
    pub floor: f64,
    pub warmup: u64,
    pub total: u64,
}

impl LrSchedule {
    /// The learning rate for the update that makes step `step + 1` (`step` counts from 0).
    pub fn at(&self, step: u64) -> f64 {
        if step < self.warmup {
            return self.peak * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1);
        let t = ((step - self.warmup) as f64 / span as f64).min(1.0);
        match self.decay {
            Decay::Constant => self.peak,
            Decay::Linear => self.peak + (self.floor - self.peak) * t,
            Decay::Cosine => {
                self.floor
                    + 0.5 * (self.peak - self.floor) * (1.0 + (std::f64::consts::PI * t).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(decay: Decay) -> LrSchedule {
        LrSchedule { decay, peak: 1.0, floor: 0.1, warmup: 10, total: 110 }
    }

    #[test]
    fn warmup_rises_linearly_to_the_peak() {
        let c = s(Decay::Cosine);
        assert!((c.at(0) - 0.1).abs() < 1e-12);
        assert!((c.at(4) - 0.5).abs() < 1e-12);
        assert!((c.at(9) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn cosine_and_linear_end_at_the_floor_and_constant_stays() {
        for d in [Decay::Cosine, Decay::Linear] {
            let c = s(d);
            assert!((c.at(10) - 1.0).abs() < 1e-12, "{d:?}");
            assert!((c.at(60) - 0.55).abs() < 1e-12, "{d:?} midpoint");
            assert!((c.at(110) - 0.1).abs() < 1e-12, "{d:?}");
            assert!((c.at(10_000) - 0.1).abs() < 1e-12, "{d:?} past the end");
        }
        assert_eq!(s(Decay::Constant).at(100), 1.0);
    }
}

//! The lab's topology: how many hosts, the condition of every directed link, and scheduled
//! faults. Read from a TOML file or built from flags; every bad value is an error naming the
//! field, the value and what was expected.
//!
//! ```toml
//! hosts = 4
//! link = "transatlantic"      # every pair, both directions (a preset name)
//! mtu = 1500
//! seed = 1
//!
//! [[links]]                   # an override; `from -> to` only, unless `symmetric = true`
//! from = 0
//! to = 1
//! preset = "lossy"            # start from a preset (optional), then override fields:
//! delay = "80ms"              # one-way
//! jitter = "2ms"
//! rate = "250mbit"
//! queue_bytes = 1048576
//! loss = 0.001                # mean loss probability
//! burst = 3.0                 # mean loss burst in packets (Gilbert–Elliott); 1 = random
//! symmetric = true
//!
//! [[faults]]
//! at = "5s"
//! action = "cut"              # cut | isolate | kill | set
//! hosts = [0, 1]              # cut: the pair; isolate/kill: one host; set: [from, to]
//! duration = "20s"            # cut, isolate: how long
//! preset = "lossy"            # set: the new condition of from -> to (and back if symmetric)
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use collectives::wan::{LinkCondition, LinkPreset, Loss};
use serde::Deserialize;
use thiserror::Error;

/// Most hosts a lab may have (one /24 of addresses, and a TUN device each).
pub const MAX_HOSTS: usize = 64;

#[derive(Debug, Error, PartialEq)]
#[error("{field}: {message}")]
pub struct TopologyError {
    pub field: String,
    pub message: String,
}

fn err(field: impl Into<String>, message: impl Into<String>) -> TopologyError {
    TopologyError { field: field.into(), message: message.into() }
}

/// A scheduled fault.
#[derive(Clone, Debug, PartialEq)]
pub enum FaultAction {
    /// Drop every packet between `a` and `b`, both directions, for `duration`.
    Cut { a: usize, b: usize, duration: Duration },
    /// Drop every packet to and from `host` for `duration`.
    Isolate { host: usize, duration: Duration },
    /// SIGKILL the command running in `host`.
    Kill { host: usize },
    /// Replace the condition of `from -> to` (and `to -> from` if symmetric).
    Set { from: usize, to: usize, condition: LinkCondition, symmetric: bool },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Fault {
    pub at: Duration,
    pub action: FaultAction,
}

/// A validated topology.
#[derive(Clone, Debug, PartialEq)]
pub struct Topology {
    pub hosts: usize,
    pub mtu: u16,
    pub seed: u64,
    /// Condition of every directed link `(from, to)`.
    pub links: BTreeMap<(usize, usize), LinkCondition>,
    pub faults: Vec<Fault>,
}

impl Topology {
    /// `hosts` hosts, every directed link in `condition`.
    pub fn uniform(hosts: usize, condition: LinkCondition) -> Result<Self, TopologyError> {
        check_hosts(hosts)?;
        let mut links = BTreeMap::new();
        for a in 0..hosts {
            for b in 0..hosts {
                if a != b {
                    links.insert((a, b), condition.clone());
                }
            }
        }
        Ok(Self { hosts, mtu: 1500, seed: 1, links, faults: Vec::new() })
    }

    pub fn condition(&self, from: usize, to: usize) -> Option<&LinkCondition> {
        self.links.get(&(from, to))
    }

    pub fn parse_toml(text: &str) -> Result<Self, TopologyError> {
        let raw: RawTopology = toml::from_str(text).map_err(|e| {
            let field =
                e.span().map(|s| format!("at byte {}", s.start)).unwrap_or_else(|| "file".into());
            err(field, e.message().to_owned())
        })?;
        raw.validate()
    }

    /// Adds a fault given on the command line: `AT:cut:A-B:DURATION`, `AT:isolate:H:DURATION`,
    /// `AT:kill:H` or `AT:set:A-B:PRESET`.
    pub fn add_fault_spec(&mut self, spec: &str) -> Result<(), TopologyError> {
        let field = format!("--fault {spec}");
        let parts: Vec<&str> = spec.split(':').collect();
        let at =
            parse_duration(parts.first().copied().unwrap_or("")).map_err(|m| err(&field, m))?;
        let pair = |s: &str| -> Result<(usize, usize), TopologyError> {
            let (a, b) =
                s.split_once('-').ok_or_else(|| err(&field, format!("{s:?}: expected A-B")))?;
            let parse = |x: &str| {
                x.parse::<usize>().map_err(|_| err(&field, format!("{x:?} is not a host number")))
            };
            Ok((parse(a)?, parse(b)?))
        };
        let host = |s: &str| {
            s.parse::<usize>().map_err(|_| err(&field, format!("{s:?} is not a host number")))
        };
        let dur = |s: &str| parse_duration(s).map_err(|m| err(&field, m));
        let action = match parts.as_slice() {
            [_, "cut", p, d] => {
                let (a, b) = pair(p)?;
                FaultAction::Cut { a, b, duration: dur(d)? }
            }
            [_, "isolate", h, d] => FaultAction::Isolate { host: host(h)?, duration: dur(d)? },
            [_, "kill", h] => FaultAction::Kill { host: host(h)? },
            [_, "set", p, preset] => {
                let (from, to) = pair(p)?;
                let preset: LinkPreset = preset.parse().map_err(|e| err(&field, format!("{e}")))?;
                FaultAction::Set { from, to, condition: preset.condition(), symmetric: true }
            }
            _ => {
                return Err(err(
                    field,
                    "expected AT:cut:A-B:DURATION, AT:isolate:H:DURATION, AT:kill:H or AT:set:A-B:PRESET",
                ));
            }
        };
        let fault = Fault { at, action };
        check_fault(&fault, self.hosts, &field)?;
        self.faults.push(fault);
        self.faults.sort_by_key(|f| f.at);
        Ok(())
    }
}

fn check_hosts(hosts: usize) -> Result<(), TopologyError> {
    if !(1..=MAX_HOSTS).contains(&hosts) {
        return Err(err("hosts", format!("{hosts}: expected 1 to {MAX_HOSTS}")));
    }
    Ok(())
}

fn check_fault(f: &Fault, hosts: usize, field: &str) -> Result<(), TopologyError> {
    let check = |h: usize| {
        if h >= hosts {
            Err(err(field, format!("host {h} does not exist (hosts are 0 to {})", hosts - 1)))
        } else {
            Ok(())
        }
    };
    match &f.action {
        FaultAction::Cut { a, b, .. } | FaultAction::Set { from: a, to: b, .. } => {
            check(*a)?;
            check(*b)?;
            if a == b {
                return Err(err(field, "a link needs two different hosts"));
            }
        }
        FaultAction::Isolate { host, .. } | FaultAction::Kill { host } => check(*host)?,
    }
    Ok(())
}

/// Parses `200us`, `50ms`, `1.5s`, `2m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("duration {s:?}: expected e.g. 50ms, 1.5s"))?;
    let secs = match unit {
        "us" => n / 1e6,
        "ms" => n / 1e3,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("duration {s:?}: unit must be us, ms, s or m")),
    };
    if !(secs.is_finite() && secs >= 0.0) {
        return Err(format!("duration {s:?} must be finite and not negative"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTopology {
    hosts: usize,
    link: Option<String>,
    mtu: Option<u16>,
    seed: Option<u64>,
    #[serde(default)]
    links: Vec<RawLink>,
    #[serde(default)]
    faults: Vec<RawFault>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLink {
    from: usize,
    to: usize,
    preset: Option<String>,
    delay: Option<String>,
    jitter: Option<String>,
    rate: Option<String>,
    queue_bytes: Option<usize>,
    loss: Option<f64>,
    burst: Option<f64>,
    #[serde(default)]
    symmetric: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFault {
    at: String,
    action: String,
    hosts: Vec<usize>,
    duration: Option<String>,
    preset: Option<String>,
    #[serde(default = "yes")]
    symmetric: bool,
}

fn yes() -> bool {
    true
}

fn preset(field: &str, name: &str) -> Result<LinkCondition, TopologyError> {
    name.parse::<LinkPreset>().map(LinkPreset::condition).map_err(|e| err(field, e.to_string()))
}

impl RawTopology {
    fn validate(self) -> Result<Topology, TopologyError> {
        check_hosts(self.hosts)?;
        let base = match &self.link {
            Some(name) => preset("link", name)?,
            None => LinkCondition::none(),
        };
        let mut t = Topology::uniform(self.hosts, base)?;
        if let Some(mtu) = self.mtu {
            if !(576..=9000).contains(&mtu) {
                return Err(err("mtu", format!("{mtu}: expected 576 to 9000")));
            }
            t.mtu = mtu;
        }
        t.seed = self.seed.unwrap_or(1);
        for (i, l) in self.links.into_iter().enumerate() {
            let f = |name: &str| format!("links[{i}].{name}");
            for (name, h) in [("from", l.from), ("to", l.to)] {
                if h >= self.hosts {
                    return Err(err(
                        f(name),
                        format!("host {h} does not exist (hosts are 0 to {})", self.hosts - 1),
                    ));
                }
            }
            if l.from == l.to {
                return Err(err(f("to"), "a link needs two different hosts"));
            }
            let mut c = match &l.preset {
                Some(p) => preset(&f("preset"), p)?,
                None => t.links[&(l.from, l.to)].clone(),
            };
            if let Some(d) = &l.delay {
                c.delay = parse_duration(d).map_err(|m| err(f("delay"), m))?;
            }
            if let Some(j) = &l.jitter {
                c.jitter = parse_duration(j).map_err(|m| err(f("jitter"), m))?;
            }
            if let Some(r) = &l.rate {
                c.rate_bps = Some(crate::perf::parse_rate(r).map_err(|m| err(f("rate"), m))?);
            }
            if let Some(q) = l.queue_bytes {
                if q < 1500 {
                    return Err(err(
                        f("queue_bytes"),
                        format!("{q}: expected at least 1500 (one packet)"),
                    ));
                }
                c.queue_bytes = Some(q);
            }
            if l.loss.is_some() || l.burst.is_some() {
                let p = l.loss.unwrap_or_else(|| c.loss.mean_loss());
                if !(0.0..1.0).contains(&p) {
                    return Err(err(f("loss"), format!("{p}: expected a probability in [0, 1)")));
                }
                let burst = l.burst.unwrap_or(1.0);
                if !(burst >= 1.0 && burst.is_finite()) {
                    return Err(err(
                        f("burst"),
                        format!("{burst}: expected a mean burst of at least 1 packet"),
                    ));
                }
                c.loss = if p == 0.0 {
                    Loss::None
                } else if burst == 1.0 {
                    Loss::Random { p }
                } else {
                    Loss::bursty(p, burst)
                };
            }
            if l.symmetric {
                t.links.insert((l.to, l.from), c.clone());
            }
            t.links.insert((l.from, l.to), c);
        }
        for (i, raw) in self.faults.into_iter().enumerate() {
            let field = format!("faults[{i}]");
            let at = parse_duration(&raw.at).map_err(|m| err(format!("{field}.at"), m))?;
            let duration = || -> Result<Duration, TopologyError> {
                let d = raw
                    .duration
                    .as_deref()
                    .ok_or_else(|| err(format!("{field}.duration"), "required for this action"))?;
                parse_duration(d).map_err(|m| err(format!("{field}.duration"), m))
            };
            let hosts_n = |n: usize| {
                if raw.hosts.len() == n {
                    Ok(())
                } else {
                    Err(err(
                        format!("{field}.hosts"),
                        format!("{:?}: expected {n} host(s)", raw.hosts),
                    ))
                }
            };
            let action = match raw.action.as_str() {
                "cut" => {
                    hosts_n(2)?;
                    FaultAction::Cut { a: raw.hosts[0], b: raw.hosts[1], duration: duration()? }
                }
                "isolate" => {
                    hosts_n(1)?;
                    FaultAction::Isolate { host: raw.hosts[0], duration: duration()? }
                }
                "kill" => {
                    hosts_n(1)?;
                    FaultAction::Kill { host: raw.hosts[0] }
                }
                "set" => {
                    hosts_n(2)?;
                    let p = raw
                        .preset
                        .as_deref()
                        .ok_or_else(|| err(format!("{field}.preset"), "required for set"))?;
                    let condition = preset(&format!("{field}.preset"), p)?;
                    FaultAction::Set {
                        from: raw.hosts[0],
                        to: raw.hosts[1],
                        condition,
                        symmetric: raw.symmetric,
                    }
                }
                other => {
                    return Err(err(
                        format!("{field}.action"),
                        format!("{other:?}: expected cut, isolate, kill or set"),
                    ));
                }
            };
            let fault = Fault { at, action };
            check_fault(&fault, t.hosts, &field)?;
            t.faults.push(fault);
        }
        t.faults.sort_by_key(|f| f.at);
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_topology() {
        let t = Topology::parse_toml(
            r#"
            hosts = 3
            link = "continental"
            [[links]]
            from = 0
            to = 1
            delay = "80ms"
            rate = "250mbit"
            loss = 0.01
            burst = 3
            [[faults]]
            at = "2s"
            action = "cut"
            hosts = [1, 2]
            duration = "500ms"
            "#,
        )
        .unwrap();
        assert_eq!(t.hosts, 3);
        let c = t.condition(0, 1).unwrap();
        assert_eq!(c.delay, Duration::from_millis(80));
        assert_eq!(c.rate_bps, Some(250_000_000));
        assert!((c.loss.mean_loss() - 0.01).abs() < 1e-9);
        // Asymmetric unless asked: the way back keeps the default.
        assert_eq!(t.condition(1, 0), Some(&LinkPreset::Continental.condition()));
        assert_eq!(
            t.faults[0].action,
            FaultAction::Cut { a: 1, b: 2, duration: Duration::from_millis(500) }
        );
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            ("hosts = 0", "hosts"),
            ("hosts = 2\nlink = \"mars\"", "link"),
            ("hosts = 2\n[[links]]\nfrom = 0\nto = 5", "links[0].to"),
            ("hosts = 2\n[[links]]\nfrom = 0\nto = 1\ndelay = \"fast\"", "links[0].delay"),
            ("hosts = 2\n[[links]]\nfrom = 0\nto = 1\nloss = 1.5", "links[0].loss"),
            (
                "hosts = 2\n[[faults]]\nat = \"1s\"\naction = \"cut\"\nhosts = [0]",
                "faults[0].hosts",
            ),
            (
                "hosts = 2\n[[faults]]\nat = \"1s\"\naction = \"boom\"\nhosts = [0]",
                "faults[0].action",
            ),
            ("hosts = 2\nmtu = 100", "mtu"),
            ("hosts = 2\ncolour = 3", "byte"),
        ];
        for (text, field) in cases {
            let e = Topology::parse_toml(text).unwrap_err();
            assert!(e.field.contains(field), "{text:?}: {e}");
        }
    }

    #[test]
    fn cli_faults_parse() {
        let mut t = Topology::uniform(4, LinkCondition::none()).unwrap();
        t.add_fault_spec("5s:cut:0-1:20s").unwrap();
        t.add_fault_spec("1s:kill:3").unwrap();
        t.add_fault_spec("2s:isolate:2:1s").unwrap();
        t.add_fault_spec("3s:set:0-2:lossy").unwrap();
        assert_eq!(t.faults[0].action, FaultAction::Kill { host: 3 });
        assert_eq!(t.faults.len(), 4);
        assert!(t.add_fault_spec("1s:kill:9").unwrap_err().message.contains("host 9"));
        assert!(t.add_fault_spec("1s:cut:0-0:1s").is_err());
        assert!(t.add_fault_spec("soon:kill:1").is_err());
        assert!(t.add_fault_spec("1s:explode").is_err());
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("200us"), Ok(Duration::from_micros(200)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("-1s").is_err());
    }
}

//! The lab's switching fabric, sans-IO: IP packets in (with the host they came from and `now`),
//! "deliver to host j at time t" or "drop" out. Each directed link has its own
//! [`LinkModel`] (rate, queue, delay, jitter, loss), and faults cut or re-shape links.

use std::net::Ipv4Addr;
use std::time::Instant;

use collectives::wan::{DropReason, LinkCondition, LinkModel, LinkStats, Verdict};

use super::topology::Topology;

/// What happens to one packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Deliver { to: usize, at: Instant },
    Drop(Dropped),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dropped {
    /// Not an IPv4 packet, or not addressed to a lab host.
    Unroutable,
    /// The link is cut (partition or isolated host).
    Cut,
    Loss,
    QueueFull,
}

struct Link {
    model: LinkModel,
    cut_until: Option<Instant>,
    cut_drops: u64,
}

/// Addresses: host `i` is `base + i + 1` in a /24.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Addressing {
    pub subnet: [u8; 3],
}

impl Addressing {
    pub fn host(&self, i: usize) -> Ipv4Addr {
        let [a, b, c] = self.subnet;
        Ipv4Addr::new(a, b, c, (i + 1) as u8)
    }

    /// Which host, if any, owns `addr`.
    pub fn host_of(&self, addr: Ipv4Addr, hosts: usize) -> Option<usize> {
        let o = addr.octets();
        if o[..3] != self.subnet {
            return None;
        }
        let i = usize::from(o[3]).checked_sub(1)?;
        (i < hosts).then_some(i)
    }
}

pub struct Fabric {
    hosts: usize,
    addressing: Addressing,
    links: Vec<Link>,
    unroutable: u64,
}

impl std::fmt::Debug for Fabric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fabric").field("hosts", &self.hosts).finish_non_exhaustive()
    }
}

impl Fabric {
    pub fn new(topology: &Topology, addressing: Addressing) -> Self {
        let n = topology.hosts;
        let mut links = Vec::with_capacity(n * n);
        for from in 0..n {
            for to in 0..n {
                let cond =
                    topology.condition(from, to).cloned().unwrap_or_else(LinkCondition::none);
                let seed =
                    topology.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ ((from * n + to) as u64);
                links.push(Link {
                    model: LinkModel::new(cond, seed),
                    cut_until: None,
                    cut_drops: 0,
                });
            }
        }
        Self { hosts: n, addressing, links, unroutable: 0 }
    }

    fn link(&mut self, from: usize, to: usize) -> &mut Link {
        &mut self.links[from * self.hosts + to]
    }

    /// A packet read from host `from`'s interface at `now`.
    pub fn route(&mut self, now: Instant, from: usize, packet: &[u8]) -> Decision {
        let Some(to) = destination(packet).and_then(|d| self.addressing.host_of(d, self.hosts))
        else {
            self.unroutable += 1;
            return Decision::Drop(Dropped::Unroutable);
        };
        if to == from {
            self.unroutable += 1;
            return Decision::Drop(Dropped::Unroutable);
        }
        let link = self.link(from, to);
        if link.cut_until.is_some_and(|t| now < t) {
            link.cut_drops += 1;
            return Decision::Drop(Dropped::Cut);
        }
        match link.model.on_packet(now, packet.len()) {
            Verdict::Deliver { at } => Decision::Deliver { to, at },
            Verdict::Drop(DropReason::Loss) => Decision::Drop(Dropped::Loss),
            Verdict::Drop(DropReason::QueueFull) => Decision::Drop(Dropped::QueueFull),
        }
    }

    /// Cuts `a <-> b` until `until`.
    pub fn cut(&mut self, a: usize, b: usize, until: Instant) {
        self.link(a, b).cut_until = Some(until);
        self.link(b, a).cut_until = Some(until);
    }

    /// Cuts every link to and from `host` until `until`.
    pub fn isolate(&mut self, host: usize, until: Instant) {
        for other in 0..self.hosts {
            if other != host {
                self.cut(host, other, until);
            }
        }
    }

    /// Replaces the condition of `from -> to` (a fresh model: queue and loss state restart).
    pub fn set(&mut self, from: usize, to: usize, condition: LinkCondition, seed: u64) {
        self.link(from, to).model = LinkModel::new(condition, seed);
    }

    /// Counters of `from -> to`: the model's, and packets dropped by a cut.
    pub fn stats(&self, from: usize, to: usize) -> (LinkStats, u64) {
        let l = &self.links[from * self.hosts + to];
        (l.model.stats(), l.cut_drops)
    }

    pub fn unroutable(&self) -> u64 {
        self.unroutable
    }
}

/// The IPv4 destination of a packet, if it is one.
pub fn destination(packet: &[u8]) -> Option<Ipv4Addr> {
    if packet.len() < 20 || packet[0] >> 4 != 4 {
        return None;
    }
    Some(Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use collectives::wan::LinkPreset;

    use super::*;

    fn packet(to: Ipv4Addr, len: usize) -> Vec<u8> {
        let mut p = vec![0u8; len.max(20)];
        p[0] = 0x45;
        p[16..20].copy_from_slice(&to.octets());
        p
    }

    fn fabric() -> (Fabric, Addressing) {
        let addressing = Addressing { subnet: [198, 18, 7] };
        let t = Topology::uniform(3, LinkPreset::Continental.condition()).unwrap();
        (Fabric::new(&t, addressing), addressing)
    }

    #[test]
    fn routes_by_destination_with_the_link_delay() {
        let (mut f, a) = fabric();
        let now = Instant::now();
        match f.route(now, 0, &packet(a.host(2), 100)) {
            Decision::Deliver { to, at } => {
                assert_eq!(to, 2);
                assert!(at - now >= Duration::from_millis(20));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            f.route(now, 0, &packet(Ipv4Addr::new(8, 8, 8, 8), 100)),
            Decision::Drop(Dropped::Unroutable)
        );
        assert_eq!(f.route(now, 0, &packet(a.host(0), 100)), Decision::Drop(Dropped::Unroutable));
        assert_eq!(f.route(now, 0, &[0x60; 40]), Decision::Drop(Dropped::Unroutable));
        assert_eq!(f.route(now, 0, &[0x45; 5]), Decision::Drop(Dropped::Unroutable));
    }

    #[test]
    fn cuts_and_isolation_expire() {
        let (mut f, a) = fabric();
        let now = Instant::now();
        f.cut(0, 1, now + Duration::from_secs(1));
        assert_eq!(f.route(now, 1, &packet(a.host(0), 100)), Decision::Drop(Dropped::Cut));
        assert!(matches!(f.route(now, 0, &packet(a.host(2), 100)), Decision::Deliver { .. }));
        let later = now + Duration::from_secs(2);
        assert!(matches!(f.route(later, 1, &packet(a.host(0), 100)), Decision::Deliver { .. }));
        f.isolate(2, later + Duration::from_secs(1));
        assert_eq!(f.route(later, 0, &packet(a.host(2), 100)), Decision::Drop(Dropped::Cut));
        assert_eq!(f.route(later, 2, &packet(a.host(1), 100)), Decision::Drop(Dropped::Cut));
        assert_eq!(f.stats(0, 2).1, 1);
    }

    #[test]
    fn addresses_map_back_to_hosts() {
        let a = Addressing { subnet: [198, 18, 3] };
        for i in 0..10 {
            assert_eq!(a.host_of(a.host(i), 10), Some(i));
        }
        assert_eq!(a.host_of(Ipv4Addr::new(198, 18, 3, 0), 10), None);
        assert_eq!(a.host_of(Ipv4Addr::new(198, 18, 3, 11), 10), None);
        assert_eq!(a.host_of(Ipv4Addr::new(198, 18, 4, 1), 10), None);
    }
}

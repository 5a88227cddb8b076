//! A ring of ranks on loopback, for tests, benchmarks and examples: a throwaway CA, one
//! certificate per rank, and UDP sockets bound to `127.0.0.1:0` before anyone dials, so rings
//! in parallel tests never collide on ports.

use std::net::{SocketAddr, UdpSocket};

use crate::group::{Emulation, Group, GroupSpec, JoinError, Member};
use crate::tls::{DevCa, Identity, TlsError, TrustAnchor};
use crate::transport::{self, NetConfig};

/// Everything one rank needs to join a [`LocalRing`].
#[derive(Debug)]
pub struct RankParts {
    pub spec: GroupSpec,
    pub anchor: TrustAnchor,
    pub identity: Identity,
    pub socket: UdpSocket,
}

impl RankParts {
    pub async fn join(self) -> Result<Group, JoinError> {
        Group::join_with_socket(self.spec, &self.anchor, &self.identity, Some(self.socket)).await
    }

    /// Joins with the network side on `net` (see [`Group::join_on`]).
    pub async fn join_on(self, net: tokio::runtime::Handle) -> Result<Group, JoinError> {
        Group::join_on(self.spec, &self.anchor, &self.identity, Some(self.socket), net).await
    }
}

/// Member names of a local ring: `rank-0`, `rank-1`, ...
pub fn rank_names(world: usize) -> Vec<String> {
    (0..world).map(|r| format!("rank-{r}")).collect()
}

/// Builds the parts of a `world`-rank ring on loopback.
#[derive(Debug)]
pub struct LocalRing;

impl LocalRing {
    /// One [`RankParts`] per rank. Emulation, if any, applies to every rank's egress (seeded per
    /// rank).
    pub fn build(
        world: usize,
        epoch: u64,
        net: &NetConfig,
        emulation: Option<Emulation>,
    ) -> Result<Vec<RankParts>, TlsError> {
        let ca = DevCa::new("longhaul local ring")?;
        let names = rank_names(world);
        let loopback: SocketAddr = ([127, 0, 0, 1], 0).into();
        let sockets = (0..world)
            .map(|_| transport::bind(loopback, net.socket_buffer))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| TlsError::Io { path: "127.0.0.1:0".into(), source })?;
        let members = names
            .iter()
            .zip(&sockets)
            .map(|(name, s)| {
                let addr =
                    s.local_addr().map_err(|source| TlsError::Io { path: name.clone(), source })?;
                Ok(Member { name: name.clone(), addr })
            })
            .collect::<Result<Vec<_>, TlsError>>()?;
        sockets
            .into_iter()
            .enumerate()
            .map(|(rank, socket)| {
                Ok(RankParts {
                    spec: GroupSpec {
                        epoch,
                        members: members.clone(),
                        rank,
                        net: net.clone(),
                        emulation: emulation.clone(),
                        port: None,
                    },
                    anchor: ca.anchor(),
                    identity: ca.issue(&names[rank])?,
                    socket,
                })
            })
            .collect()
    }
}

//! Failure semantics over real QUIC: dead and silent peers, aborts, deadlines, impostors and
//! malformed frames. In every case the operation fails with a typed error naming the peer and
//! the cause, and the caller's buffer is left exactly as it was.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use collectives::testing::LocalRing;
use collectives::wire::{Codec, HEADER_LEN, Header, Kind, WirePhase};
use collectives::{
    Compression, DevCa, Emulation, Group, JoinError, LinkCondition, NetConfig, OpError, PortLease,
    ReduceOp, tls,
};

fn net() -> NetConfig {
    NetConfig {
        rtt: Duration::from_millis(1),
        chunk_bytes: 64 << 10,
        connections_per_peer: 1,
        keep_alive: Duration::from_millis(200),
        idle_timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(10),
        op_deadline: Duration::from_secs(60),
        ..NetConfig::default()
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn data(rank: usize, len: usize) -> Vec<f32> {
    (0..len).map(|i| (i % 1000) as f32 * 0.001 + rank as f32).collect()
}

/// A rank whose process dies mid-operation (its runtime is torn down without a word, as with
/// SIGKILL): every survivor fails within the idle timeout plus a few hops, buffers unchanged.
#[test]
fn killed_peer_fails_every_survivor() {
    let world = 4;
    let victim = 2;
    let len = 4 << 20;
    // 100 Mbit/s links make the operation last long enough to be killed in the middle.
    let emulation =
        Emulation { condition: LinkCondition::none().with_rate_bps(Some(100_000_000)), seed: 1 };
    let parts = LocalRing::build(world, 1, &net(), Some(emulation)).unwrap();
    let threads: Vec<_> = parts
        .into_iter()
        .enumerate()
        .map(|(rank, p)| {
            std::thread::spawn(move || {
                let rt = runtime();
                // The victim's network runs on its own runtime, so shutting that down kills it
                // abruptly, as a process death would.
                let mut g = if rank == victim {
                    rt.block_on(p.join_on(rt.handle().clone())).unwrap()
                } else {
                    rt.block_on(p.join()).unwrap()
                };
                let original = data(rank, len);
                let mut buf = original.clone();
                if rank == victim {
                    let op = rt.spawn(async move {
                        g.all_reduce(&mut buf, ReduceOp::Sum, Compression::None).await
                    });
                    std::thread::sleep(Duration::from_millis(500));
                    drop(op);
                    rt.shutdown_background();
                    return None;
                }
                let started = Instant::now();
                let result = rt.block_on(g.all_reduce(&mut buf, ReduceOp::Sum, Compression::None));
                Some((result, started.elapsed(), buf == original))
            })
        })
        .collect();
    for (rank, t) in threads.into_iter().enumerate() {
        let Some((result, elapsed, unchanged)) = t.join().unwrap() else { continue };
        let err = result.expect_err("a survivor must fail");
        // How long detection took is printed, not asserted (a loaded machine is slower, not
        // wrong); that it was the death, not the operation's 60 s deadline, the error says.
        println!("rank {rank}: failed after {elapsed:?}: {err}");
        assert!(unchanged, "rank {rank}: buffer changed");
        match (rank, &err) {
            // The victim's neighbours see it go silent.
            (1 | 3, OpError::PeerLost { peer, .. }) => assert_eq!(peer, "rank-2"),
            // Everyone else hears about it from a neighbour, with the original cause.
            (_, OpError::RemoteAbort { reason, .. }) => {
                assert!(reason.contains("rank-2"), "{reason}")
            }
            (_, other) => panic!("rank {rank}: unexpected error {other}"),
        }
    }
}

/// Joins both ranks of a two-rank ring.
fn pair(rt: &tokio::runtime::Runtime, net: &NetConfig) -> (Group, Group) {
    let mut parts = LocalRing::build(2, 1, net, None).unwrap().into_iter();
    let (a, b) = (parts.next().unwrap(), parts.next().unwrap());
    rt.block_on(async { tokio::try_join!(a.join(), b.join()) }).unwrap()
}

/// The abort handle stops an operation stuck on a peer that is alive (keep-alives flow) but
/// never sends; the peer's next operation fails with the reason.
#[test]
fn abort_handle_stops_an_operation_on_a_silent_peer() {
    let rt = runtime();
    let (mut g0, mut g1) = pair(&rt, &net());
    let original = data(0, 100_000);
    let mut buf = original.clone();
    let abort = g0.abort_handle();
    let (result, elapsed_after_abort) = rt.block_on(async {
        let trigger = async {
            tokio::time::sleep(Duration::from_millis(2500)).await;
            abort.abort("epoch 2 announced");
            Instant::now()
        };
        let (result, aborted_at) =
            tokio::join!(g0.all_reduce(&mut buf, ReduceOp::Sum, Compression::None), trigger);
        (result, aborted_at.elapsed())
    });
    // Nothing else could end it: keep-alives flow, and the deadline is a minute away.
    assert_eq!(result.unwrap_err(), OpError::Aborted { reason: "epoch 2 announced".into() });
    println!("the operation ended {elapsed_after_abort:?} after the abort");
    assert_eq!(buf, original);
    // The silent peer learns why when it finally joins the operation, and the aborted group
    // stays aborted.
    let mut late = data(1, 100_000);
    let err = rt.block_on(g1.all_reduce(&mut late, ReduceOp::Sum, Compression::None)).unwrap_err();
    assert_eq!(late, data(1, 100_000));
    match &err {
        OpError::RemoteAbort { peer, reason, .. } => {
            assert_eq!(peer, "rank-0");
            assert!(reason.contains("epoch 2 announced"), "{reason}");
        }
        other => panic!("unexpected {other}"),
    }
    assert!(matches!(rt.block_on(g0.barrier()), Err(OpError::Broken { .. })));
}

/// The per-operation deadline fails an operation whose peer never joins it.
#[test]
fn deadline_bounds_an_operation() {
    let rt = runtime();
    let net = NetConfig { op_deadline: Duration::from_millis(700), ..net() };
    let (mut g0, _g1) = pair(&rt, &net);
    let original = data(0, 1000);
    let mut buf = original.clone();
    let started = Instant::now();
    let err =
        rt.block_on(g0.all_reduce(&mut buf, ReduceOp::Average, Compression::Int8)).unwrap_err();
    assert!(matches!(err, OpError::Timeout { op: 0, .. }), "{err}");
    assert!(started.elapsed() >= Duration::from_millis(700));
    assert_eq!(buf, original);
}

/// Both ranks try to form a ring where rank 1 holds `identity`; returns both results.
fn join_with_rank1_identity(
    identity: collectives::Identity,
) -> (Result<Group, JoinError>, Result<Group, JoinError>) {
    let rt = runtime();
    let net = NetConfig { connect_timeout: Duration::from_secs(3), ..net() };
    let mut parts = LocalRing::build(2, 1, &net, None).unwrap().into_iter();
    let a = parts.next().unwrap();
    let mut b = parts.next().unwrap();
    b.identity = identity;
    rt.block_on(async { tokio::join!(a.join(), b.join()) })
}

fn assert_refused(result: Result<Group, JoinError>, needle: &str) {
    let err = result.expect_err("must be refused");
    let text = err.to_string();
    println!("refused: {text}");
    assert!(text.contains(needle), "{text:?} should mention {needle:?}");
}

#[test]
fn certificate_from_another_ca_is_refused() {
    let stranger = DevCa::new("someone else").unwrap().issue("rank-1").unwrap();
    let (r0, r1) = join_with_rank1_identity(stranger);
    // Rank 0 rejects rank 1's server certificate; rank 1 is told its client certificate was bad.
    assert_refused(r0, "UnknownIssuer");
    assert_refused(r1, "refused");
}

#[test]
fn valid_certificate_of_a_non_member_is_refused() {
    // A certificate from the ring's own CA, for a name that is not in this epoch.
    let rt = runtime();
    let ca = DevCa::new("ring").unwrap();
    let net = NetConfig { connect_timeout: Duration::from_secs(3), ..net() };
    let mut parts = LocalRing::build(2, 1, &net, None).unwrap().into_iter();
    let mut a = parts.next().unwrap();
    let mut b = parts.next().unwrap();
    a.anchor = ca.anchor();
    b.anchor = ca.anchor();
    a.identity = ca.issue("rank-0").unwrap();
    b.identity = ca.issue("rank-7").unwrap();
    let (r0, r1) = rt.block_on(async { tokio::join!(a.join(), b.join()) });
    // Rank 0 dialed "rank-1" and got a certificate for someone else.
    assert_refused(r0, "rank-1");
    // Rank 1 is refused too (by rank 0's verifier, or by rank 0 giving up first).
    assert_refused(r1, "refused");
}

/// An outsider with a valid certificate of the ring's CA, for a name that is not a member,
/// dials a rank that is forming its ring: it is refused with the reason, and the ring still forms
/// with the real neighbour.
#[test]
fn non_member_dialer_is_refused_and_the_ring_still_forms() {
    let rt = runtime();
    let ca = DevCa::new("ring").unwrap();
    let mut parts = LocalRing::build(2, 1, &net(), None).unwrap().into_iter();
    let mut a = parts.next().unwrap();
    let mut b = parts.next().unwrap();
    a.anchor = ca.anchor();
    b.anchor = ca.anchor();
    a.identity = ca.issue("rank-0").unwrap();
    b.identity = ca.issue("rank-1").unwrap();
    let target = a.spec.members[0].clone();
    let outsider = ca.issue("rank-7").unwrap();
    let anchor = ca.anchor();
    rt.block_on(async move {
        let forming = tokio::spawn(a.join());
        let client = tls::client_config(&anchor, &outsider).unwrap();
        let client = quinn::ClientConfig::new(Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(client).unwrap(),
        ));
        let mut endpoint = quinn::Endpoint::client(([127, 0, 0, 1], 0).into()).unwrap();
        endpoint.set_default_client_config(client);
        let conn = endpoint.connect(target.addr, &target.name).unwrap().await.unwrap();
        let reason = conn.closed().await.to_string();
        println!("outsider refused: {reason}");
        assert!(reason.contains("names no member of this epoch"), "{reason}");
        let (g1, g0) = tokio::join!(b.join(), forming);
        let (mut g0, mut g1) = (g0.unwrap().unwrap(), g1.unwrap());
        let (r0, r1) = tokio::join!(g0.barrier(), g1.barrier());
        r0.unwrap();
        r1.unwrap();
    });
}

/// A member that sends a malformed frame: the operation fails with a protocol error naming it.
/// The impostor speaks QUIC and TLS correctly (it holds rank 1's real certificate) but writes
/// `frame` on a stream instead of a real chunk.
fn malformed(frame: Vec<u8>, needle: &str) {
    malformed_on(frame, needle, Via::Dialed);
}

/// Which of the rogue's connections to the honest rank carries the frame: the one it dialed
/// (it is the honest rank's predecessor there) or the one it accepted (its successor there).
#[derive(Clone, Copy, PartialEq)]
enum Via {
    Dialed,
    Accepted,
}

fn malformed_on(frame: Vec<u8>, needle: &str, via: Via) {
    let rt = runtime();
    let net = net();
    let mut parts = LocalRing::build(2, 5, &net, None).unwrap().into_iter();
    let honest = parts.next().unwrap();
    let rogue = parts.next().unwrap();
    rt.block_on(async move {
        let names: Vec<String> = rogue.spec.members.iter().map(|m| m.name.clone()).collect();
        let rank0 = rogue.spec.members[0].clone();
        let transport = Arc::new(net.transport());
        let server = tls::server_config(&rogue.anchor, &rogue.identity, &names).unwrap();
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(
            quinn::crypto::rustls::QuicServerConfig::try_from(server).unwrap(),
        ));
        server.transport_config(transport.clone());
        let client = tls::client_config(&rogue.anchor, &rogue.identity).unwrap();
        let mut client = quinn::ClientConfig::new(Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(client).unwrap(),
        ));
        client.transport_config(transport);
        let runtime = Arc::new(quinn::TokioRuntime);
        let socket = quinn::Runtime::wrap_udp_socket(&*runtime, rogue.socket).unwrap();
        let mut endpoint = quinn::Endpoint::new_with_abstract_socket(
            net.endpoint_config(),
            Some(server),
            socket,
            runtime,
        )
        .unwrap();
        endpoint.set_default_client_config(client);

        let rogue_side = async {
            let accepted = endpoint.accept().await.unwrap().await.unwrap();
            let mut hello = accepted.open_uni().await.unwrap();
            hello.write_all(&collectives::wire::admission(5)).await.unwrap();
            hello.finish().unwrap();
            let dialed = endpoint.connect(rank0.addr, &rank0.name).unwrap().await.unwrap();
            let conn = if via == Via::Dialed { &dialed } else { &accepted };
            let mut s = conn.open_uni().await.unwrap();
            s.write_all(&frame).await.unwrap();
            s.finish().unwrap();
            (accepted, dialed)
        };
        let (group, conns) = tokio::join!(honest.join(), rogue_side);
        let mut group = group.unwrap();
        let original = data(0, 10_000);
        let mut buf = original.clone();
        let err = group.all_reduce(&mut buf, ReduceOp::Sum, Compression::None).await.unwrap_err();
        println!("rejected: {err}");
        match &err {
            OpError::Protocol { peer, cause, .. } => {
                assert_eq!(peer, "rank-1");
                assert!(cause.contains(needle), "{cause:?} should mention {needle:?}");
            }
            other => panic!("unexpected {other}"),
        }
        assert_eq!(buf, original);
        drop(conns);
    });
}

fn header() -> Header {
    Header {
        kind: Kind::Data,
        epoch: 5,
        op: 0,
        phase: WirePhase::ReduceScatter,
        codec: Codec::F32,
        step: 0,
        chunk: 0,
        len: 4 * 5000,
    }
}

#[test]
fn oversized_frame_is_rejected() {
    malformed(Header { len: u32::MAX, ..header() }.encode().to_vec(), "exceeds the limit");
}

#[test]
fn frame_from_another_epoch_is_rejected() {
    malformed(Header { epoch: 4, ..header() }.encode().to_vec(), "epoch 4");
}

#[test]
fn garbage_is_rejected() {
    malformed([0xde, 0xad, 0xbe, 0xef].repeat(8), "bad magic");
}

#[test]
fn truncated_header_is_rejected() {
    malformed(header().encode()[..HEADER_LEN - 5].to_vec(), "truncated");
}

#[test]
fn truncated_payload_is_rejected() {
    let mut frame = header().encode().to_vec();
    frame.extend([0u8; 100]);
    malformed(frame, "truncated");
}

#[test]
fn chunk_outside_the_schedule_is_rejected() {
    malformed(Header { step: 9, len: 0, ..header() }.encode().to_vec(), "outside the schedule");
}

#[test]
fn wrong_codec_is_rejected() {
    malformed(Header { codec: Codec::Int8Block, len: 0, ..header() }.encode().to_vec(), "disagree");
}

#[test]
fn a_frame_from_the_successor_is_rejected() {
    // Frames travel forward only: a successor cannot pre-empt the predecessor's chunks (and
    // have the honest predecessor blamed for a duplicate).
    malformed_on(header().encode().to_vec(), "forward only", Via::Accepted);
}

#[test]
fn a_frame_two_operations_ahead_is_rejected() {
    // An honest peer is at most one operation ahead; anything further is refused before its
    // payload is read.
    malformed(
        Header { op: 2, len: 0, ..header() }.encode().to_vec(),
        "when this rank has begun only",
    );
}

#[test]
fn bad_group_specs_are_named() {
    let rt = runtime();
    let mut parts = LocalRing::build(2, 1, &net(), None).unwrap();
    let mut p = parts.remove(0);
    p.spec.rank = 5;
    let err = rt.block_on(p.join()).unwrap_err();
    assert!(err.to_string().contains("rank 5"), "{err}");
    let mut p = parts.remove(0);
    p.spec.members[0].name = "rank 0".into();
    let err = rt.block_on(p.join()).unwrap_err();
    assert!(err.to_string().contains("rank 0"), "{err}");
}

/// A group closed while its peer is silent keeps its connection draining for three probe
/// timeouts (a minute after a long stall of this process), and its endpoint the port. The next
/// epoch binds the same port: the group's port lease takes the socket from the old endpoint,
/// so the port is free at once while the old connection still drains.
#[test]
fn a_released_port_is_free_while_the_old_endpoint_drains() {
    let rt = runtime();
    let peer_rt = runtime();
    let mut parts = LocalRing::build(2, 1, &net(), None).unwrap().into_iter();
    let (mut a, b) = (parts.next().unwrap(), parts.next().unwrap());
    let lease = PortLease::default();
    a.spec.port = Some(lease.clone());
    let addr = a.spec.members[0].addr;
    let (g0, g1) =
        rt.block_on(async { tokio::join!(a.join(), b.join_on(peer_rt.handle().clone())) });
    let (g0, g1) = (g0.unwrap(), g1.unwrap());
    // The peer goes silent (its network torn down without a word); rank 0 closes its group.
    peer_rt.shutdown_background();
    drop(g1);
    rt.block_on(async move { drop(g0) });
    assert!(lease.is_held(), "the endpoint still has its socket while it drains");
    let before = collectives::transport::bind(addr, 1 << 20).map(drop);
    println!("binding {addr} before the release: {before:?}");
    lease.release();
    assert!(!lease.is_held());
    let again = collectives::transport::bind(addr, 1 << 20);
    assert!(again.is_ok(), "the released port is free: {again:?}");
    // The old endpoint drains without a socket, and a group forms on the port again.
    let mut parts = LocalRing::build(2, 2, &net(), None).unwrap().into_iter();
    let (mut a, mut b) = (parts.next().unwrap(), parts.next().unwrap());
    a.socket = again.unwrap();
    a.spec.members[0].addr = addr;
    b.spec.members[0].addr = addr;
    let (mut g0, mut g1) = rt.block_on(async { tokio::try_join!(a.join(), b.join()) }).unwrap();
    let (mut x, mut y) = (vec![1.0f32; 1000], vec![2.0f32; 1000]);
    rt.block_on(async {
        let (r0, r1) = tokio::join!(
            g0.all_reduce(&mut x, ReduceOp::Sum, Compression::None),
            g1.all_reduce(&mut y, ReduceOp::Sum, Compression::None)
        );
        r0.unwrap();
        r1.unwrap();
    });
    assert!(x.iter().chain(&y).all(|v| *v == 3.0));
}

//! Small measuring tools, run inside lab hosts as `wanlab tool NAME ...`: a UDP echo and ping,
//! a TCP bulk sender and sink, a paced UDP sender and counting sink, and a TCP reachability
//! probe. Each prints one JSON object (or one line per probe) on stdout. Blocking sockets, one
//! flow each: they measure the path, not themselves.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct PingReport {
    pub sent: usize,
    pub received: usize,
    pub rtt_ms_median: f64,
    pub rtt_ms_min: f64,
    pub rtt_ms_max: f64,
}

/// Echoes datagrams back to their sender until `secs` pass.
pub fn udp_echo(port: u16, secs: f64) -> Result<()> {
    let sock = UdpSocket::bind(("0.0.0.0", port))?;
    sock.set_read_timeout(Some(Duration::from_millis(100)))?;
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let mut buf = [0u8; 2048];
    while Instant::now() < end {
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => {
                let _ = sock.send_to(&buf[..n], from);
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Sends `count` probes `interval` apart and reports round-trip times.
pub fn udp_ping(to: SocketAddr, count: usize, interval: Duration) -> Result<PingReport> {
    let sock = UdpSocket::bind("0.0.0.0:0")?;
    sock.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut rtts = Vec::new();
    let mut buf = [0u8; 64];
    for seq in 0..count as u64 {
        let sent = Instant::now();
        sock.send_to(&seq.to_le_bytes(), to)?;
        // Wait for this probe's echo; stale echoes of earlier probes are skipped.
        loop {
            match sock.recv_from(&mut buf) {
                Ok((8, _)) if buf[..8] == seq.to_le_bytes() => {
                    rtts.push(sent.elapsed().as_secs_f64() * 1e3);
                    break;
                }
                Ok(_) => continue,
                Err(_) => break,
            }
        }
        std::thread::sleep(interval);
    }
    rtts.sort_by(f64::total_cmp);
    Ok(PingReport {
        sent: count,
        received: rtts.len(),
        rtt_ms_median: rtts.get(rtts.len() / 2).copied().unwrap_or(f64::NAN),
        rtt_ms_min: rtts.first().copied().unwrap_or(f64::NAN),
        rtt_ms_max: rtts.last().copied().unwrap_or(f64::NAN),
    })
}

#[derive(Debug, Serialize)]
pub struct FlowReport {
    pub bytes: u64,
    pub seconds: f64,
    pub bits_per_second: f64,
}

/// Accepts one TCP connection and reads it to the end; the rate counts what arrived after the
/// first `warmup` seconds (after slow start).
pub fn tcp_sink(port: u16, warmup: f64) -> Result<FlowReport> {
    let listener = TcpListener::bind(("0.0.0.0", port))?;
    let (mut s, _) = listener.accept()?;
    let mut buf = vec![0u8; 1 << 16];
    let mut bytes = 0u64;
    let start = Instant::now();
    let warm = start + Duration::from_secs_f64(warmup);
    let mut measured_from = None;
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        if Instant::now() >= warm {
            measured_from.get_or_insert_with(Instant::now);
            bytes += n as u64;
        }
    }
    let seconds = measured_from.map_or(0.0, |t| t.elapsed().as_secs_f64());
    Ok(FlowReport { bytes, seconds, bits_per_second: bytes as f64 * 8.0 / seconds.max(1e-9) })
}

/// Sends as fast as TCP allows for `secs`; the rate counts only the last `secs - warmup`
/// seconds, after slow start.
pub fn tcp_send(to: SocketAddr, secs: f64, warmup: f64) -> Result<FlowReport> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut s = loop {
        match TcpStream::connect_timeout(&to, Duration::from_secs(2)) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!("connect {to}: {e}; retrying");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(e).context(format!("connecting to {to}")),
        }
    };
    let buf = vec![0u8; 1 << 16];
    let start = Instant::now();
    let warm = start + Duration::from_secs_f64(warmup);
    let end = start + Duration::from_secs_f64(secs);
    let (mut bytes, mut measured_from) = (0u64, None);
    while Instant::now() < end {
        let n = s.write(&buf)?;
        if Instant::now() >= warm {
            measured_from.get_or_insert(Instant::now());
            bytes += n as u64;
        }
    }
    let seconds = measured_from.map_or(0.0, |t| t.elapsed().as_secs_f64());
    Ok(FlowReport { bytes, seconds, bits_per_second: bytes as f64 * 8.0 / seconds.max(1e-9) })
}

#[derive(Debug, Serialize)]
pub struct UdpSinkReport {
    pub received: u64,
    pub highest_seq: u64,
    pub bytes: u64,
    pub seconds: f64,
    pub bits_per_second: f64,
}

/// Counts sequence-numbered datagrams until `idle` passes without one (after the first).
pub fn udp_sink(port: u16, idle: Duration, limit: Duration) -> Result<UdpSinkReport> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    // A large receive buffer: the sink must not be where packets are lost.
    let _ = sock.set_recv_buffer_size(32 << 20);
    sock.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())?;
    let sock: UdpSocket = sock.into();
    sock.set_read_timeout(Some(idle))?;
    let mut buf = [0u8; 65536];
    let (mut received, mut bytes, mut highest) = (0u64, 0u64, 0u64);
    let (mut first, mut last) = (None, Instant::now());
    let begin = Instant::now();
    while begin.elapsed() < limit {
        match sock.recv_from(&mut buf) {
            Ok((n, _)) if n >= 8 => {
                let seq = u64::from_le_bytes(buf[..8].try_into().unwrap_or_default());
                highest = highest.max(seq);
                received += 1;
                bytes += n as u64;
                first.get_or_insert_with(Instant::now);
                last = Instant::now();
            }
            Ok(_) => {}
            Err(_) if first.is_some() => break,
            Err(_) => {}
        }
    }
    let seconds = first.map_or(0.0, |f| (last - f).as_secs_f64());
    Ok(UdpSinkReport {
        received,
        highest_seq: highest,
        bytes,
        seconds,
        bits_per_second: bytes as f64 * 8.0 / seconds.max(1e-9),
    })
}

/// What a paced UDP sender managed to send.
#[derive(Debug, Serialize)]
pub struct SendReport {
    pub sent: u64,
    pub bits_per_second: f64,
}

/// Sends `size`-byte sequence-numbered datagrams at `rate_bps` for `secs`.
pub fn udp_send(to: SocketAddr, rate_bps: u64, secs: f64, size: usize) -> Result<SendReport> {
    let sock = UdpSocket::bind("0.0.0.0:0")?;
    let size = size.max(8);
    let mut buf = vec![0u8; size];
    let gap = Duration::from_secs_f64(size as f64 * 8.0 / rate_bps as f64);
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let mut seq = 0u64;
    let mut next = start;
    while next < end {
        let now = Instant::now();
        if now < next {
            std::thread::sleep(next - now);
        }
        buf[..8].copy_from_slice(&seq.to_le_bytes());
        // A full socket buffer would be our loss, not the path's: retry until it takes it.
        while let Err(e) = sock.send_to(&buf, to) {
            if e.kind() != ErrorKind::WouldBlock {
                return Err(e.into());
            }
        }
        seq += 1;
        next += gap;
    }
    let took = start.elapsed().as_secs_f64();
    Ok(SendReport { sent: seq, bits_per_second: (seq * size as u64) as f64 * 8.0 / took })
}

/// Tries a TCP connection every `every` for `total` and prints `t=SECONDS ok|fail` per try.
pub fn reach(to: SocketAddr, every: Duration, total: Duration) -> Result<()> {
    let start = Instant::now();
    let mut out = std::io::stdout();
    while start.elapsed() < total {
        let t = start.elapsed().as_secs_f64();
        let ok = TcpStream::connect_timeout(&to, every).is_ok();
        writeln!(out, "t={t:.2} {}", if ok { "ok" } else { "fail" })?;
        out.flush()?;
        let spent = start.elapsed().as_secs_f64() - t;
        if spent < every.as_secs_f64() {
            std::thread::sleep(every - Duration::from_secs_f64(spent));
        }
    }
    Ok(())
}

/// Accepts and closes TCP connections until `secs` pass (the other end of [`reach`]).
pub fn tcp_accept(port: u16, secs: f64) -> Result<()> {
    let listener = TcpListener::bind(("0.0.0.0", port))?;
    listener.set_nonblocking(true)?;
    let end = Instant::now() + Duration::from_secs_f64(secs);
    while Instant::now() < end {
        match listener.accept() {
            Ok((s, _)) => drop(s),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

//! The measurement loop of `allreduce-perf`, shared by the binary and the quickstart example.
//!
//! Like nccl-tests' `all_reduce_perf`: for each size of a geometric sweep it runs warm-up and
//! timed iterations and reports the mean time, `algbw = S / t` and
//! `busbw = algbw · 2(N−1)/N`, the error against an exact reference, and operation latency
//! percentiles. Every rank fills its buffer from a deterministic function of (rank, index), so
//! any rank can compute the reference sum of all ranks without communicating.

use std::fmt::Write as _;
use std::time::Duration;

use collectives::{Compression, Element, Group, OpError, ReduceOp};
use half::{bf16, f16};
use hdrhistogram::Histogram;
use serde::Serialize;

/// Element type of the benchmark buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DTypeArg {
    F32,
    Bf16,
    F16,
}

impl DTypeArg {
    pub fn size(self) -> usize {
        match self {
            DTypeArg::F32 => 4,
            DTypeArg::Bf16 | DTypeArg::F16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DTypeArg::F32 => "float",
            DTypeArg::Bf16 => "bfloat16",
            DTypeArg::F16 => "half",
        }
    }
}

/// What to measure.
#[derive(Clone, Debug, Serialize)]
pub struct Sweep {
    pub min_bytes: usize,
    pub max_bytes: usize,
    pub factor: usize,
    pub iters: usize,
    pub warmup: usize,
    pub dtype: DTypeArg,
    #[serde(serialize_with = "display")]
    pub compression: Compression,
    pub average: bool,
}

fn display<T: std::fmt::Display, S: serde::Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

impl Sweep {
    /// The sizes of the sweep, in bytes, each a whole number of elements.
    pub fn sizes(&self) -> Vec<usize> {
        let elem = self.dtype.size();
        let mut sizes = Vec::new();
        let mut s = self.min_bytes.max(elem);
        while s <= self.max_bytes {
            sizes.push(s / elem * elem);
            if self.factor <= 1 {
                break;
            }
            s = s.saturating_mul(self.factor);
        }
        sizes
    }
}

/// One line of the table.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub bytes: usize,
    pub count: usize,
    pub time_us: f64,
    pub algbw_gbps: f64,
    pub busbw_gbps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// Largest absolute error against the exact reference.
    pub max_err: f64,
    /// Relative RMS error against the exact reference.
    pub rel_err: f64,
    /// Bytes this rank sent per operation (headers included).
    pub wire_bytes: u64,
    /// Whether every rank ended with the same bits (checked by broadcasting rank 0's hash).
    pub agree: bool,
}

/// Input of `rank` at `index`: a cheap, deterministic pseudo-random value in [-1, 1).
pub fn input_value(rank: usize, index: usize) -> f32 {
    let mut x = (index as u64) ^ ((rank as u64) << 40) ^ 0x9e37_79b9_7f4a_7c15;
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    ((x >> 40) as f32) / ((1u64 << 23) as f32) - 1.0
}

fn fill<T: Element>(rank: usize, buf: &mut [T]) {
    for (i, v) in buf.iter_mut().enumerate() {
        *v = T::from_f32(input_value(rank, i));
    }
}

/// Max absolute and relative RMS error of `result` against the exact reduction of every rank's
/// input (as rounded to `T`).
fn errors<T: Element>(result: &[T], world: usize, average: bool) -> (f64, f64) {
    let (mut max, mut err2, mut norm2) = (0.0f64, 0.0f64, 0.0f64);
    for (i, r) in result.iter().enumerate() {
        let mut want: f64 =
            (0..world).map(|k| f64::from(T::from_f32(input_value(k, i)).to_f32())).sum();
        if average {
            want /= world as f64;
        }
        let e = f64::from(r.to_f32()) - want;
        max = max.max(e.abs());
        err2 += e * e;
        norm2 += want * want;
    }
    let rel = if norm2 > 0.0 { (err2 / norm2).sqrt() } else { err2.sqrt() };
    (max, rel)
}

fn hash_bits<T: Element>(buf: &[T]) -> u64 {
    // FNV-1a over the f32 bit patterns.
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for v in buf {
        for b in v.to_f32().to_bits().to_le_bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// Runs the sweep on this rank's `group`; every rank must call it with the same `sweep`.
pub async fn run(group: &mut Group, sweep: &Sweep) -> Result<Vec<Row>, OpError> {
    match sweep.dtype {
        DTypeArg::F32 => run_typed::<f32>(group, sweep).await,
        DTypeArg::Bf16 => run_typed::<bf16>(group, sweep).await,
        DTypeArg::F16 => run_typed::<f16>(group, sweep).await,
    }
}

async fn run_typed<T: Element>(group: &mut Group, sweep: &Sweep) -> Result<Vec<Row>, OpError> {
    let world = group.world();
    let rank = group.rank();
    let op = if sweep.average { ReduceOp::Average } else { ReduceOp::Sum };
    let mut rows = Vec::new();
    for bytes in sweep.sizes() {
        let count = bytes / sweep.dtype.size();
        let mut input = vec![T::from_f32(0.0); count];
        fill(rank, &mut input);
        let mut buf = input.clone();
        let mut hist = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)
            .map_err(|e| OpError::Invalid(e.to_string()))?;
        let mut total = Duration::ZERO;
        let mut wire = 0;
        for i in 0..sweep.warmup + sweep.iters {
            buf.copy_from_slice(&input);
            group.barrier().await?;
            let stats = group.all_reduce(&mut buf, op, sweep.compression).await?;
            if i >= sweep.warmup {
                total += stats.elapsed;
                wire = stats.bytes_sent;
                hist.saturating_record(stats.elapsed.as_micros().max(1) as u64);
            }
        }
        let (max_err, rel_err) = errors(&buf, world, sweep.average);
        let mut hash = hash_bits(&buf).to_le_bytes();
        let mine = hash;
        group.broadcast(&mut hash, 0).await?;
        let t = total.as_secs_f64() / sweep.iters.max(1) as f64;
        let algbw = if t > 0.0 { bytes as f64 / t / 1e9 } else { 0.0 };
        rows.push(Row {
            bytes,
            count,
            time_us: t * 1e6,
            algbw_gbps: algbw,
            busbw_gbps: algbw * 2.0 * (world as f64 - 1.0) / world as f64,
            p50_us: hist.value_at_quantile(0.5) as f64,
            p99_us: hist.value_at_quantile(0.99) as f64,
            max_err,
            rel_err,
            wire_bytes: wire,
            agree: hash == mine,
        });
    }
    Ok(rows)
}

/// The header of the table, nccl-tests style.
pub fn table_header() -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "#{:>12} {:>11} {:>8} {:>6} {:>6} {:>11} {:>10} {:>10} {:>10} {:>10} {:>9} {:>9} {:>12} {:>5}",
        "size",
        "count",
        "type",
        "redop",
        "compr",
        "time(us)",
        "algbw",
        "busbw",
        "p50(us)",
        "p99(us)",
        "maxerr",
        "relerr",
        "wire(B)",
        "agree"
    );
    let _ = write!(
        s,
        "#{:>12} {:>11} {:>8} {:>6} {:>6} {:>11} {:>10} {:>10} {:>10} {:>10} {:>9} {:>9} {:>12} {:>5}",
        "(B)", "(elements)", "", "", "", "", "(GB/s)", "(GB/s)", "", "", "", "", "(per rank)", ""
    );
    s
}

/// One line of the table.
pub fn table_row(sweep: &Sweep, row: &Row) -> String {
    format!(
        " {:>12} {:>11} {:>8} {:>6} {:>6} {:>11.1} {:>10.4} {:>10.4} {:>10} {:>10} {:>9.2e} {:>9.2e} {:>12} {:>5}",
        row.bytes,
        row.count,
        sweep.dtype.name(),
        if sweep.average { "avg" } else { "sum" },
        sweep.compression.to_string(),
        row.time_us,
        row.algbw_gbps,
        row.busbw_gbps,
        row.p50_us,
        row.p99_us,
        row.max_err,
        row.rel_err,
        row.wire_bytes,
        if row.agree { "yes" } else { "NO" },
    )
}

/// Parses a size such as `1048576`, `64K`, `1M`, `2G` (binary multiples).
pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let mult = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                _ => return Err(format!("size {s:?}: unknown suffix {c:?}; use K, M or G")),
            };
            (&t[..i], mult)
        }
        _ => (t, 1),
    };
    let n: usize = num.parse().map_err(|_| format!("size {s:?} is not a number"))?;
    n.checked_mul(mult).ok_or_else(|| format!("size {s:?} is too large"))
}

/// Parses a rate such as `250mbit`, `1gbit`, `1000000` (bits per second).
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let (num, mult) = if let Some(n) = t.strip_suffix("gbit") {
        (n, 1_000_000_000f64)
    } else if let Some(n) = t.strip_suffix("mbit") {
        (n, 1_000_000f64)
    } else if let Some(n) = t.strip_suffix("kbit") {
        (n, 1_000f64)
    } else {
        (t.as_str(), 1f64)
    };
    let n: f64 =
        num.parse().map_err(|_| format!("rate {s:?}: expected e.g. 250mbit, 1gbit or bits/s"))?;
    if !(n.is_finite() && n > 0.0) {
        return Err(format!("rate {s:?} must be positive"));
    }
    Ok((n * mult) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_sweep() {
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("12"), Ok(12));
        assert!(parse_size("1X").unwrap_err().contains("suffix"));
        assert!(parse_size("abc").is_err());
        let sweep = Sweep {
            min_bytes: 1 << 20,
            max_bytes: 64 << 20,
            factor: 4,
            iters: 1,
            warmup: 0,
            dtype: DTypeArg::F32,
            compression: Compression::None,
            average: false,
        };
        assert_eq!(sweep.sizes(), vec![1 << 20, 4 << 20, 16 << 20, 64 << 20]);
    }

    #[test]
    fn rates_parse() {
        assert_eq!(parse_rate("250mbit"), Ok(250_000_000));
        assert_eq!(parse_rate("1Gbit"), Ok(1_000_000_000));
        assert_eq!(parse_rate("1.5gbit"), Ok(1_500_000_000));
        assert!(parse_rate("-1mbit").is_err());
        assert!(parse_rate("fast").is_err());
    }

    #[test]
    fn inputs_are_deterministic_and_bounded() {
        for i in 0..10_000 {
            let v = input_value(3, i);
            assert!((-1.0..1.0).contains(&v));
            assert_eq!(v, input_value(3, i));
        }
        assert_ne!(input_value(0, 5), input_value(1, 5));
    }
}

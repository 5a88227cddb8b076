//! Shard bytes: from the local cache, a `file://` URI, or HTTPS from the coordinator (mutual
//! TLS with the worker's certificate, the coordinator's CA pinned), always checked against the
//! SHA-256 the lease names before anything reads them.
//!
//! The cache is content-addressed (`cache/<sha256>`): a shard is written to a temporary file
//! while it is hashed, and renamed into place only when the hash matches, so a crash or a bad
//! download never leaves a file that looks valid.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use rustls_pki_types::ServerName;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::agent::{Identity, Lease};

/// Largest response head accepted.
const MAX_HEAD: usize = 16 << 10;

/// The shard's bytes on local disk, verified: a path in `cache_dir`.
pub async fn shard(lease: &Lease, identity: &Identity, cache_dir: &Path) -> Result<PathBuf> {
    let want = lease.sha256.to_ascii_lowercase();
    if want.len() != 64 || !want.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("shard {}: the lease's SHA-256 {:?} is not 64 hex digits", lease.shard, lease.sha256);
    }
    let dst = cache_dir.join(&want);
    if tokio::fs::metadata(&dst).await.is_ok_and(|m| m.len() == lease.size) {
        return Ok(dst);
    }
    tokio::fs::create_dir_all(cache_dir)
        .await
        .with_context(|| format!("creating {}", cache_dir.display()))?;
    let tmp = cache_dir.join(format!("{want}.part-{}", std::process::id()));
    let result = if !lease.url.is_empty() {
        download(&lease.url, identity, &tmp, lease.size).await
    } else if let Some(path) = lease.uri.strip_prefix("file://") {
        copy(Path::new(path), &tmp).await
    } else {
        Err(anyhow::anyhow!(
            "shard {} ({}) has no URL the worker can fetch: the coordinator must serve it \
             (start it with --shards-listen)",
            lease.shard,
            lease.uri
        ))
    };
    let got = match result {
        Ok(h) => h,
        Err(e) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e.context(format!("fetching shard {} ({})", lease.shard, lease.uri)));
        }
    };
    if got != want {
        let _ = tokio::fs::remove_file(&tmp).await;
        bail!("shard {} ({}): SHA-256 is {got}, the lease says {want}", lease.shard, lease.uri);
    }
    tokio::fs::rename(&tmp, &dst).await.with_context(|| format!("writing {}", dst.display()))?;
    Ok(dst)
}

/// Copies a local file to `dst`, returning its SHA-256.
async fn copy(src: &Path, dst: &Path) -> Result<String> {
    let src = src.to_owned();
    let dst = dst.to_owned();
    tokio::task::spawn_blocking(move || -> Result<String> {
        let mut r =
            std::fs::File::open(&src).with_context(|| format!("opening {}", src.display()))?;
        let mut w = std::fs::File::create(&dst)?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = std::io::Read::read(&mut r, &mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            w.write_all(&buf[..n])?;
        }
        w.sync_all()?;
        Ok(client::pki::hex(&h.finalize()))
    })
    .await?
}

/// `GET url` (HTTP/1.1 over TLS 1.3) into `dst`, returning the body's SHA-256.
async fn download(url: &str, identity: &Identity, dst: &Path, size: u64) -> Result<String> {
    let rest = url.strip_prefix("https://").with_context(|| format!("{url} is not https"))?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let (host, _) = authority.rsplit_once(':').with_context(|| format!("no port in {url}"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
    let me = client::identity(&identity.cert_pem, &identity.key_pem)?;
    let tls = client::tls_client_config(&identity.ca_pin, Some(me), b"http/1.1")?;
    let tcp = tokio::net::TcpStream::connect(authority)
        .await
        .with_context(|| format!("connecting to {authority}"))?;
    let name = ServerName::try_from(host)?;
    let mut s = tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nhost: {authority}\r\nx-longhaul-worker: {}\r\nconnection: close\r\n\r\n",
        identity.worker_id
    );
    s.write_all(req.as_bytes()).await?;

    // The head, then the body streamed to disk while hashing.
    let mut buf = Vec::with_capacity(8 << 10);
    let split = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > MAX_HEAD {
            bail!("response head longer than {MAX_HEAD} bytes");
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed before the response head ended");
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..split]).into_owned();
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        let body = String::from_utf8_lossy(&buf[split + 4..]);
        bail!("{url}: HTTP {status}: {}", body.trim());
    }
    let mut file = tokio::fs::File::create(dst).await?;
    let mut h = Sha256::new();
    let mut got = 0u64;
    let first = &buf[split + 4..];
    h.update(first);
    file.write_all(first).await?;
    got += first.len() as u64;
    let mut chunk = vec![0u8; 256 << 10];
    loop {
        let n = match s.read(&mut chunk).await {
            Ok(0) => break,
            Ok(n) => n,
            // The server may close without a TLS close_notify once the body is complete.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && got >= size => break,
            Err(e) => return Err(e.into()),
        };
        got += n as u64;
        if got > size {
            bail!("{url}: more than the {size} bytes the lease names");
        }
        h.update(&chunk[..n]);
        file.write_all(&chunk[..n]).await?;
    }
    if got != size {
        bail!("{url}: {got} bytes, the lease names {size}");
    }
    file.sync_all().await?;
    Ok(client::pki::hex(&h.finalize()))
}

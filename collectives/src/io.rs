//! The network runtime: where every group's QUIC endpoint, connections and frame readers and
//! writers run.
//!
//! Liveness must not depend on what the caller does with its own threads. A caller may run the
//! ring's operations on a runtime whose threads are busy reducing gigabytes (eight ranks in one
//! test process on two cores), or on a thread that libtorch saturates. If the QUIC drivers
//! shared those threads, keep-alives and acknowledgements would wait behind the reduction, and
//! a busy peer would look dead: that happened (a fresh-clone CI run lost a peer to "no packets
//! within the idle timeout" with 8 ranks reducing 64 MiB each on 2 cores). So the network side
//! has threads of its own, which do nothing but move and decrypt packets: the operating system
//! schedules them beside the reduction, and a timer that fires is served within a time slice.
//!
//! One runtime serves every group of the process (built on first use, never shut down).

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use quinn::{AsyncTimer, AsyncUdpSocket, Runtime, TokioRuntime};
use tokio::runtime::Handle;

/// Threads of the network runtime: enough to decrypt several connections in parallel, few
/// enough to leave the cores to training.
fn threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(1, 4)
}

/// The process's network runtime.
pub fn handle() -> &'static Handle {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads())
                .thread_name("longhaul-net")
                .enable_all()
                .build()
                // Without threads and a reactor nothing in this crate can work; there is no
                // caller to hand the error to that could do better than stop.
                .unwrap_or_else(|e| panic!("cannot start the network runtime: {e}"))
        })
        .handle()
}

/// A [`quinn::Runtime`] that runs everything (drivers, timers, sockets) on the network runtime,
/// whichever runtime the caller is on.
#[derive(Clone)]
pub(crate) struct NetRuntime {
    handle: Handle,
}

impl NetRuntime {
    pub(crate) fn new(handle: Handle) -> Arc<Self> {
        Arc::new(Self { handle })
    }
}

impl fmt::Debug for NetRuntime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NetRuntime")
    }
}

impl Runtime for NetRuntime {
    fn new_timer(&self, i: Instant) -> Pin<Box<dyn AsyncTimer>> {
        let _in = self.handle.enter();
        TokioRuntime.new_timer(i)
    }

    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        self.handle.spawn(future);
    }

    fn wrap_udp_socket(&self, t: std::net::UdpSocket) -> io::Result<Arc<dyn AsyncUdpSocket>> {
        let _in = self.handle.enter();
        TokioRuntime.wrap_udp_socket(t)
    }

    fn now(&self) -> Instant {
        Instant::now()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_network_runtime_serves_callers_without_a_runtime() {
        let rt = NetRuntime::new(handle().clone());
        let (tx, rx) = std::sync::mpsc::channel();
        rt.spawn(Box::pin(async move {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            let _ = tx.send(std::thread::current().name().map(str::to_owned));
        }));
        let name = rx.recv().expect("the task ran");
        assert_eq!(name.as_deref(), Some("longhaul-net"));
    }
}

//! The gRPC control plane and the `longhaul` CLI. Filled by the coordinator issue (#4); empty until then.

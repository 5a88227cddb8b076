//! Wire types of the gRPC API (tonic + prost). Filled by the coordinator issue (#4); empty until then.

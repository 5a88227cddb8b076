//! Flat views of tensors, the state hash, and checks of received state.

use tch::{Device, Kind, Tensor};

/// The tensors concatenated into one flat f32 tensor on the CPU.
pub fn flatten(ts: &[Tensor]) -> Tensor {
    let _guard = tch::no_grad_guard();
    let parts: Vec<Tensor> = ts
        .iter()
        .map(|t| t.detach().to_device(Device::Cpu).to_kind(Kind::Float).reshape([-1]))
        .collect();
    Tensor::cat(&parts, 0)
}

/// The gradients of `params` flattened (zeros where a parameter has none).
pub fn flatten_grads(params: &[Tensor]) -> Tensor {
    let grads: Vec<Tensor> = params
        .iter()
        .map(|p| {
            let g = p.grad();
            if g.defined() { g } else { p.zeros_like() }
        })
        .collect();
    flatten(&grads)
}

/// A flat CPU f32 tensor as a vector.
pub fn to_vec(flat: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(flat.contiguous()).unwrap_or_default()
}

/// Copies consecutive ranges of `flat` into `into` (shapes, devices and kinds kept).
pub fn unflatten_into(flat: &Tensor, into: &[Tensor]) {
    let _guard = tch::no_grad_guard();
    let mut at = 0i64;
    for t in into {
        let n = t.numel() as i64;
        let src = flat.narrow(0, at, n).view(t.size().as_slice());
        t.shallow_clone().copy_(&src);
        at += n;
    }
}

/// Writes `flat` into the gradients of `params`.
pub fn unflatten_into_grads(flat: &[f32], params: &[Tensor]) {
    let flat = Tensor::from_slice(flat);
    // Every parameter has a gradient tensor (see `Trainer::new`).
    let grads: Vec<Tensor> = params.iter().map(|p| p.grad()).collect();
    unflatten_into(&flat, &grads);
}

/// The 64-bit state hash: XXH3 over the little-endian f32 values of `tensors`, in order, then
/// the little-endian `extra` integers, streamed (no concatenated copy). It detects divergence
/// between replicas (it is not a defence against a forger: quorums are, see the coordinator),
/// and it is cheap enough to run after every step: SHA-256 cost 10 % of a CPU step of the
/// 3.3M-parameter gpt bench.
pub fn hash_tensors(tensors: &[Tensor], extra: &[u64]) -> u64 {
    let _guard = tch::no_grad_guard();
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for t in tensors {
        let flat =
            t.detach().to_device(Device::Cpu).to_kind(Kind::Float).contiguous().reshape([-1]);
        let values = Vec::<f32>::try_from(&flat).unwrap_or_default();
        for chunk in values.chunks(1 << 14) {
            let bytes: Vec<u8> = chunk.iter().flat_map(|x| x.to_le_bytes()).collect();
            h.update(&bytes);
        }
    }
    for x in extra {
        h.update(&x.to_le_bytes());
    }
    h.digest()
}

/// Whether every value of `tensors` is finite and within `bound` in magnitude.
pub fn finite_within(tensors: &[Tensor], bound: f64) -> bool {
    let _guard = tch::no_grad_guard();
    tensors.iter().all(|t| {
        let t = t.detach().to_kind(Kind::Float);
        let max = t.abs().max().double_value(&[]);
        max.is_finite() && max <= bound
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_streamed_hash_is_the_hash_of_the_concatenation() {
        let a = Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
        let b = Tensor::from_slice(&[-4.0f32; 40_000]);
        let flat = flatten(&[a.shallow_clone(), b.shallow_clone()]);
        let bytes: Vec<u8> = to_vec(&flat).iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(
            hash_tensors(&[a.shallow_clone(), b.shallow_clone()], &[]),
            xxhash_rust::xxh3::xxh3_64(&bytes)
        );
        assert_ne!(
            hash_tensors(&[a.shallow_clone(), b.shallow_clone()], &[1]),
            hash_tensors(&[a, b], &[2])
        );
    }

    #[test]
    fn finiteness_and_bounds_are_checked() {
        assert!(finite_within(&[Tensor::from_slice(&[1.0f32, -2.0])], 2.0));
        assert!(!finite_within(&[Tensor::from_slice(&[1.0f32, f32::NAN])], 2.0));
        assert!(!finite_within(&[Tensor::from_slice(&[1.0f32, 3.0])], 2.0));
    }
}

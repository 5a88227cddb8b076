//! The inner optimizers (AdamW, SGD with momentum), gradient clipping, and DiLoCo's outer
//! Nesterov step, over a fixed, named list of parameters.
//!
//! Written out rather than taken from `tch::nn::Optimizer` so that the state is ours to
//! checkpoint and to send to a joining worker, and so the update is one deterministic sequence
//! of tensor ops: two workers applying it to identical inputs get identical bits.

use tch::{Kind, Tensor};

/// Optimizer settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OptimConfig {
    pub kind: OptimKind,
    pub weight_decay: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub momentum: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptimKind {
    AdamW,
    Sgd,
}

/// An optimizer's state for `n` parameters.
#[derive(Debug)]
pub struct Optimizer {
    cfg: OptimConfig,
    /// Updates applied so far (AdamW's bias correction).
    pub steps: i64,
    /// Per parameter: AdamW's first and second moments, or SGD's momentum buffer (and an
    /// empty tensor).
    slots: Vec<(Tensor, Tensor)>,
}

impl Optimizer {
    pub fn new(cfg: OptimConfig, params: &[Tensor]) -> Self {
        let slots = params
            .iter()
            .map(|p| match cfg.kind {
                OptimKind::AdamW => (p.zeros_like(), p.zeros_like()),
                OptimKind::Sgd => (p.zeros_like(), Tensor::zeros([0], (Kind::Float, p.device()))),
            })
            .collect();
        Self { cfg, steps: 0, slots }
    }

    /// Applies one update with learning rate `lr` to `params` from their `.grad()`.
    pub fn step(&mut self, params: &[Tensor], lr: f64) {
        let _guard = tch::no_grad_guard();
        self.steps += 1;
        let c = self.cfg;
        for (p, (a, b)) in params.iter().zip(self.slots.iter_mut()) {
            let mut p = p.shallow_clone();
            let g = p.grad();
            if !g.defined() {
                continue;
            }
            // Decay matrices and embeddings, not biases or norm gains.
            let decay = p.dim() >= 2 && c.weight_decay > 0.0;
            match c.kind {
                OptimKind::AdamW => {
                    if decay {
                        let _ = p.g_mul_scalar_(1.0 - lr * c.weight_decay);
                    }
                    let (b1, b2) = c.betas;
                    let _ = a.g_mul_scalar_(b1).g_add_(&(&g * (1.0 - b1)));
                    let _ = b.g_mul_scalar_(b2).g_add_(&(&g * &g * (1.0 - b2)));
                    let bc1 = 1.0 - b1.powi(self.steps as i32);
                    let bc2 = 1.0 - b2.powi(self.steps as i32);
                    let denom = (&*b / bc2).sqrt() + c.eps;
                    let _ = p.g_sub_(&(&*a / &denom * (lr / bc1)));
                }
                OptimKind::Sgd => {
                    let g = if decay { &g + &p * c.weight_decay } else { g };
                    if c.momentum > 0.0 {
                        if self.steps == 1 {
                            a.copy_(&g);
                        } else {
                            let _ = a.g_mul_scalar_(c.momentum).g_add_(&g);
                        }
                        let _ = p.g_sub_(&(&*a * lr));
                    } else {
                        let _ = p.g_sub_(&(&g * lr));
                    }
                }
            }
        }
    }

    /// Every state tensor with its kind and parameter index, in the one fixed order that both
    /// the named form (checkpoints) and the flat form (state blobs) use.
    fn labelled(&self) -> impl Iterator<Item = (&'static str, usize, &Tensor)> {
        let kind = self.cfg.kind;
        self.slots.iter().enumerate().flat_map(move |(i, (a, b))| match kind {
            OptimKind::AdamW => vec![("exp_avg", i, a), ("exp_avg_sq", i, b)],
            OptimKind::Sgd => vec![("momentum", i, a)],
        })
    }

    /// The state as named tensors (`<kind>.<param name>`), for checkpoints.
    pub fn state(&self, names: &[String]) -> Vec<(String, Tensor)> {
        self.labelled()
            .map(|(kind, i, t)| (format!("{kind}.{}", names[i]), t.shallow_clone()))
            .collect()
    }

    /// The state tensors in the same order (for flattening).
    pub fn tensors(&self) -> Vec<Tensor> {
        self.labelled().map(|(_, _, t)| t.shallow_clone()).collect()
    }
}

/// The global L2 norm of the gradients of `params`.
pub fn grad_norm(params: &[Tensor]) -> f64 {
    let _guard = tch::no_grad_guard();
    let mut total = 0.0f64;
    for p in params {
        let g = p.grad();
        if g.defined() {
            total += g.to_kind(Kind::Double).square().sum(Kind::Double).double_value(&[]);
        }
    }
    total.sqrt()
}

/// Scales the gradients so that their global norm is at most `max` (no-op for `max <= 0`).
/// Returns the norm before clipping.
pub fn clip_grad_norm(params: &[Tensor], max: f64) -> f64 {
    let norm = grad_norm(params);
    if max > 0.0 && norm > max {
        let _guard = tch::no_grad_guard();
        let scale = max / (norm + 1e-6);
        for p in params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.g_mul_scalar_(scale);
            }
        }
    }
    norm
}

/// DiLoCo's outer optimizer: SGD with Nesterov momentum on the pseudo-gradient.
#[derive(Debug)]
pub struct Outer {
    pub lr: f64,
    pub momentum: f64,
}

impl Outer {
    /// `global -= lr * (delta + momentum * buf)` after `buf = momentum * buf + delta`
    /// (PyTorch's `SGD(nesterov=True)` with `delta` as the gradient).
    pub fn step(&self, global: &mut Tensor, buf: &mut Tensor, delta: &Tensor) {
        let _guard = tch::no_grad_guard();
        let _ = buf.g_mul_scalar_(self.momentum).g_add_(delta);
        let update = delta + &*buf * self.momentum;
        let _ = global.g_sub_(&(update * self.lr));
    }
}

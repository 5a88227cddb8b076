//! The models: built-in `gpt`, `mlp` and `convnet` written with `tch::nn`, and TorchScript
//! modules exported from PyTorch.
//!
//! Every model maps an input batch to logits. For token tasks the input is `[B, T]` int64 and
//! the logits are `[B, T, V]` (causal: position t sees tokens ..= t). For tensor tasks the input
//! is a float tensor `[B, ...]` and the logits `[B, K]`.
//!
//! Parameters are created in a fixed order from a seeded generator, so every worker that builds
//! the same model with the same seed holds bitwise-identical parameters.

use std::path::Path;

use tch::nn;
use tch::{Kind, Tensor};

/// The shape of a built-in model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Gpt,
    Mlp,
    Convnet,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub layers: i64,
    pub width: i64,
    pub heads: i64,
    /// Longest sequence (gpt's position table).
    pub context: i64,
    /// Output classes: the vocabulary for token tasks, the class count for tensor tasks.
    pub outputs: i64,
    /// What goes in.
    pub input: Input,
}

/// The input a model is built for.
#[derive(Clone, Debug, PartialEq)]
pub enum Input {
    /// Token ids in `0..vocab`.
    Tokens { vocab: i64 },
    /// Float features of this shape per sample (`[F]` for mlp, `[C, H, W]` for convnet).
    Features(Vec<i64>),
}

/// A trainable model: its forward pass. Parameters live in the `VarStore` it was built in.
pub trait Net: std::fmt::Debug + Send {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor, tch::TchError>;

    /// The name PyTorch's `state_dict()` gives the parameter the `VarStore` calls `name`
    /// (checkpoints use it, so PyTorch loads them as they are). The built-in models name their
    /// variables as their reference PyTorch modules in `examples/pytorch/` do.
    fn state_dict_name(&self, name: &str) -> String {
        name.to_owned()
    }
}

/// Builds a built-in model under `vs`.
pub fn build(vs: &nn::Path<'_>, cfg: &ModelConfig) -> Result<Box<dyn Net>, String> {
    match (cfg.arch, &cfg.input) {
        (Arch::Gpt, Input::Tokens { vocab }) => Ok(Box::new(Gpt::new(vs, cfg, *vocab)?)),
        (Arch::Gpt, Input::Features(_)) => {
            Err("model `gpt` needs a token dataset (synthetic-addition, text, tokens-u16/u32)"
                .into())
        }
        (Arch::Mlp, input) => Ok(Box::new(Mlp::new(vs, cfg, input))),
        (Arch::Convnet, input) => Convnet::new(vs, cfg, input).map(|m| Box::new(m) as Box<dyn Net>),
    }
}

// ---- gpt ----

/// A decoder-only transformer in the GPT-2 style: token and learned position embeddings,
/// pre-norm blocks (causal self-attention with a fused QKV projection, then a 4x GELU MLP),
/// a final layer norm and an output head tied to the token embedding.
#[derive(Debug)]
pub struct Gpt {
    wte: nn::Embedding,
    wpe: nn::Embedding,
    blocks: Vec<Block>,
    ln_f: nn::LayerNorm,
    heads: i64,
    context: i64,
}

#[derive(Debug)]
struct Block {
    ln1: nn::LayerNorm,
    qkv: nn::Linear,
    proj: nn::Linear,
    ln2: nn::LayerNorm,
    fc: nn::Linear,
    out: nn::Linear,
}

fn init_linear(vs: nn::Path<'_>, i: i64, o: i64, std: f64) -> nn::Linear {
    let c = nn::LinearConfig {
        ws_init: nn::Init::Randn { mean: 0.0, stdev: std },
        bs_init: Some(nn::Init::Const(0.0)),
        bias: true,
    };
    nn::linear(vs, i, o, c)
}

impl Gpt {
    fn new(vs: &nn::Path<'_>, cfg: &ModelConfig, vocab: i64) -> Result<Self, String> {
        let (w, heads) = (cfg.width, cfg.heads);
        if heads <= 0 || w % heads != 0 {
            return Err(format!("gpt width {w} is not a multiple of its {heads} heads"));
        }
        let emb = nn::EmbeddingConfig {
            ws_init: nn::Init::Randn { mean: 0.0, stdev: 0.02 },
            ..Default::default()
        };
        // GPT-2's scaled init of the residual projections.
        let resid_std = 0.02 / (2.0 * cfg.layers as f64).sqrt();
        let wte = nn::embedding(vs / "wte", vocab, w, emb);
        let wpe = nn::embedding(vs / "wpe", cfg.context, w, emb);
        let blocks = (0..cfg.layers)
            .map(|i| {
                let b = vs / "h" / i;
                Block {
                    ln1: nn::layer_norm(&b / "ln_1", vec![w], Default::default()),
                    qkv: init_linear(&b / "attn" / "c_attn", w, 3 * w, 0.02),
                    proj: init_linear(&b / "attn" / "c_proj", w, w, resid_std),
                    ln2: nn::layer_norm(&b / "ln_2", vec![w], Default::default()),
                    fc: init_linear(&b / "mlp" / "c_fc", w, 4 * w, 0.02),
                    out: init_linear(&b / "mlp" / "c_proj", 4 * w, w, resid_std),
                }
            })
            .collect();
        let ln_f = nn::layer_norm(vs / "ln_f", vec![w], Default::default());
        Ok(Self { wte, wpe, blocks, ln_f, heads, context: cfg.context })
    }
}

impl Net for Gpt {
    fn forward_t(&self, xs: &Tensor, _train: bool) -> Result<Tensor, tch::TchError> {
        let (b, t) = xs.size2()?;
        if t > self.context {
            return Err(tch::TchError::Shape(format!(
                "sequence of {t} tokens is longer than the model's context of {}",
                self.context
            )));
        }
        let pos = Tensor::arange(t, (Kind::Int64, xs.device()));
        let mut x = xs.apply(&self.wte) + pos.apply(&self.wpe);
        let w = self.wte.ws.size()[1];
        let hd = w / self.heads;
        for blk in &self.blocks {
            let h = x.apply(&blk.ln1).apply(&blk.qkv);
            let qkv = h.view([b, t, 3, self.heads, hd]).permute([2, 0, 3, 1, 4]);
            let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
            let y = Tensor::scaled_dot_product_attention(
                &q,
                &k,
                &v,
                None::<Tensor>,
                0.0,
                true,
                None,
                false,
            );
            let y = y.transpose(1, 2).contiguous().view([b, t, w]).apply(&blk.proj);
            x = &x + y; // not `+=`: in place, it would break autograd
            let m = x.apply(&blk.ln2).apply(&blk.fc).gelu("tanh").apply(&blk.out);
            x = &x + m;
        }
        let x = x.apply(&self.ln_f);
        // Tied output head.
        Ok(x.matmul(&self.wte.ws.tr()))
    }
}

// ---- mlp ----

/// For tensor tasks: flatten, `layers` hidden layers of `width` with ReLU, a linear head. For
/// token tasks: per position, the token's embedding plus its position's, through the same
/// hidden stack, to the vocabulary (a bigram model: it sees one token).
#[derive(Debug)]
pub struct Mlp {
    embed: Option<(nn::Embedding, nn::Embedding)>,
    hidden: Vec<nn::Linear>,
    head: nn::Linear,
}

impl Mlp {
    fn new(vs: &nn::Path<'_>, cfg: &ModelConfig, input: &Input) -> Self {
        let w = cfg.width;
        let (embed, mut dim) = match input {
            Input::Tokens { vocab } => {
                let te = nn::embedding(vs / "wte", *vocab, w, Default::default());
                let pe = nn::embedding(vs / "wpe", cfg.context.max(1), w, Default::default());
                (Some((te, pe)), w)
            }
            Input::Features(shape) => (None, shape.iter().product()),
        };
        let mut hidden = Vec::new();
        for i in 0..cfg.layers {
            hidden.push(nn::linear(vs / "hidden" / i, dim, w, Default::default()));
            dim = w;
        }
        let head = nn::linear(vs / "head", dim, cfg.outputs, Default::default());
        Self { embed, hidden, head }
    }
}

impl Net for Mlp {
    fn forward_t(&self, xs: &Tensor, _train: bool) -> Result<Tensor, tch::TchError> {
        let mut x = match &self.embed {
            Some((te, pe)) => {
                let t = xs.size2()?.1;
                xs.apply(te) + Tensor::arange(t, (Kind::Int64, xs.device())).apply(pe)
            }
            None => xs.flatten(1, -1),
        };
        for l in &self.hidden {
            x = x.apply(l).relu();
        }
        Ok(x.apply(&self.head))
    }
}

// ---- convnet ----

/// For image tasks (`[C, H, W]`): `layers` 3x3 convolutions of `width` channels with ReLU and
/// 2x2 max-pooling, global average pooling, a linear head. For token tasks: causal 1-D
/// convolutions (kernel 3, left-padded) over the embeddings, with residual connections.
#[derive(Debug)]
pub struct Convnet {
    embed: Option<nn::Embedding>,
    conv2: Vec<nn::Conv2D>,
    conv1: Vec<nn::Conv1D>,
    head: nn::Linear,
}

impl Convnet {
    fn new(vs: &nn::Path<'_>, cfg: &ModelConfig, input: &Input) -> Result<Self, String> {
        let w = cfg.width;
        match input {
            Input::Tokens { vocab } => {
                let embed = nn::embedding(vs / "wte", *vocab, w, Default::default());
                let conv1 = (0..cfg.layers)
                    .map(|i| nn::conv1d(vs / "conv" / i, w, w, 3, Default::default()))
                    .collect();
                let head = nn::linear(vs / "head", w, cfg.outputs, Default::default());
                Ok(Self { embed: Some(embed), conv2: vec![], conv1, head })
            }
            Input::Features(shape) => {
                let [c, _, _] = shape[..] else {
                    return Err(format!(
                        "model `convnet` needs image inputs [C, H, W]; the dataset has {shape:?}"
                    ));
                };
                let conv = nn::ConvConfig { padding: 1, ..Default::default() };
                let conv2 = (0..cfg.layers)
                    .map(|i| nn::conv2d(vs / "conv" / i, if i == 0 { c } else { w }, w, 3, conv))
                    .collect();
                let head = nn::linear(vs / "head", w, cfg.outputs, Default::default());
                Ok(Self { embed: None, conv2, conv1: vec![], head })
            }
        }
    }
}

impl Net for Convnet {
    fn forward_t(&self, xs: &Tensor, _train: bool) -> Result<Tensor, tch::TchError> {
        match &self.embed {
            Some(embed) => {
                // [B, T] → [B, W, T]; pad 2 on the left so position t sees t-2..=t.
                let mut x = xs.apply(embed).transpose(1, 2);
                for c in &self.conv1 {
                    x = &x + x.constant_pad_nd([2, 0]).apply(c).relu();
                }
                Ok(x.transpose(1, 2).apply(&self.head))
            }
            None => {
                let mut x = xs.shallow_clone();
                for c in &self.conv2 {
                    x = x.apply(c).relu();
                    if x.size()[2] >= 2 && x.size()[3] >= 2 {
                        x = x.max_pool2d_default(2);
                    }
                }
                Ok(x.mean_dim([2i64, 3].as_slice(), false, Kind::Float).apply(&self.head))
            }
        }
    }
}

// ---- TorchScript ----

/// A TorchScript module exported from PyTorch, trained through tch's trainable modules.
///
/// The contract (see `examples/torchscript/`): `forward(x: Tensor) -> Tensor` maps the batch's
/// inputs (`[B, T]` int64 tokens, or `[B, ...]` float features) to logits (`[B, T, V]` or
/// `[B, K]`); the worker computes the loss (cross-entropy). Parameters are the module's
/// `named_parameters()`; buffers are not synchronised.
#[derive(Debug)]
pub struct Scripted {
    module: tch::TrainableCModule,
    /// `VarStore` name → the module's own parameter name (`blocks.0.att.in_proj_weight`):
    /// tch's `VarStore` separates path parts with dots, so it stores each parameter under its
    /// name with the dots made underscores.
    names: std::collections::BTreeMap<String, String>,
}

impl Scripted {
    pub fn load(vs: &nn::Path<'_>, path: &Path) -> Result<Self, String> {
        let cannot =
            |e: tch::TchError| format!("cannot load TorchScript module {}: {e}", path.display());
        let mut module = tch::TrainableCModule::load(path, vs.clone()).map_err(cannot)?;
        module.set_train();
        let plain = tch::CModule::load(path).map_err(cannot)?;
        let mut names = std::collections::BTreeMap::new();
        for (name, _) in plain.named_parameters().map_err(cannot)? {
            if let Some(other) = names.insert(name.replace('.', "_"), name.clone()) {
                return Err(format!(
                    "TorchScript module {}: parameters `{other}` and `{name}` differ only in dots \
                     and underscores, which the trainer cannot tell apart",
                    path.display()
                ));
            }
        }
        Ok(Self { module, names })
    }
}

impl Net for Scripted {
    fn forward_t(&self, xs: &Tensor, _train: bool) -> Result<Tensor, tch::TchError> {
        self.module.forward_ts(&[xs])
    }

    fn state_dict_name(&self, name: &str) -> String {
        self.names.get(name).cloned().unwrap_or_else(|| name.to_owned())
    }
}

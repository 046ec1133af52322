//! The DiT forward on the CPU, in stages over preallocated buffers, with the FORA cache.
//!
//! A computing step runs every block and (when given a cache) stores each block's attention
//! output (after proj) and MLP output (after fc2), before gate and residual. A reuse step skips
//! attention and MLP and applies `x += gate_msa_l * A_l; x += gate_mlp_l * M_l` with the
//! current step's gates; embeddings, every modulation and the final layer are recomputed.
//! Reuse steps run single-threaded through [`ops::linear_rows`] and touch no allocator.

use super::ops;
use crate::backend::StepMode;
use crate::config::DitConfig;
use crate::weights::{ensure_free_memory, f32_bytes, f32_len, zeros, DitWeights, FREQ_DIM};
use anyhow::{ensure, Context, Result};

/// Every activation buffer of a forward over `rows` model rows.
pub struct Activations {
    rows: usize,
    /// Patches `[N*T, C*p*p]`.
    pub patches: Vec<f32>,
    /// Residual stream `[N*T, D]`.
    pub x: Vec<f32>,
    /// LayerNorm + modulate output `[N*T, D]`.
    pub h: Vec<f32>,
    /// `[N*T, 3D]`.
    pub qkv: Vec<f32>,
    /// Attention before proj, heads concatenated `[N*T, D]`.
    pub attn: Vec<f32>,
    /// MLP hidden `[N*T, M]`.
    pub mlp: Vec<f32>,
    /// A block's attention output when no cache takes it `[N*T, D]`.
    pub attn_out: Vec<f32>,
    /// A block's MLP output when no cache takes it `[N*T, D]`.
    pub mlp_out: Vec<f32>,
    /// Timestep features `[N, 256]`.
    pub t_feat: Vec<f32>,
    /// First t-MLP layer after SiLU `[N, D]`.
    pub t_hidden: Vec<f32>,
    /// Conditioning c = t_emb + y_emb `[N, D]`.
    pub c: Vec<f32>,
    /// SiLU(c) `[N, D]`.
    pub silu_c: Vec<f32>,
    /// Block modulations `[L, N, 6D]`: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp,
    /// gate_mlp.
    pub mods: Vec<f32>,
    /// Final-layer modulation `[N, 2D]`: shift, scale.
    pub final_mods: Vec<f32>,
    /// Final linear output `[N*T, p*p*out_ch]`.
    pub final_out: Vec<f32>,
    /// Model output `[N, out_ch, H, W]`.
    pub out: Vec<f32>,
    /// Attention scores scratch, one `[T, T]` per parallel attention task.
    scores: Vec<f32>,
}

/// A buffer's dims, up to five, held on the stack.
#[derive(Clone, Copy)]
struct Dims {
    d: [usize; 5],
    rank: usize,
}

impl Dims {
    fn of(dims: &[usize]) -> Dims {
        let mut d = [1; 5];
        d[..dims.len()].copy_from_slice(dims);
        Dims {
            d,
            rank: dims.len(),
        }
    }
}

impl std::ops::Deref for Dims {
    type Target = [usize];
    fn deref(&self) -> &[usize] {
        &self.d[..self.rank]
    }
}

impl std::fmt::Debug for Dims {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}

impl Activations {
    /// Each buffer of a forward over `rows` model rows: its name and dims, in field order.
    /// (On the stack: [`Activations::check`] runs it every forward, and a reuse step allocates
    /// nothing.)
    fn layout(cfg: &DitConfig, rows: usize) -> [(&'static str, Dims); 17] {
        let (t, d) = (cfg.tokens(), cfg.hidden);
        let tasks = rayon::current_num_threads().clamp(1, rows.saturating_mul(cfg.heads));
        [
            (
                "patches",
                Dims::of(&[rows, t, cfg.in_channels, cfg.patch, cfg.patch]),
            ),
            ("residual stream", Dims::of(&[rows, t, d])),
            ("normalized activations", Dims::of(&[rows, t, d])),
            ("qkv", Dims::of(&[rows, t, 3, d])),
            ("attention", Dims::of(&[rows, t, d])),
            ("MLP hidden", Dims::of(&[rows, t, cfg.mlp_hidden()])),
            ("attention output", Dims::of(&[rows, t, d])),
            ("MLP output", Dims::of(&[rows, t, d])),
            ("timestep features", Dims::of(&[rows, FREQ_DIM])),
            ("timestep hidden", Dims::of(&[rows, d])),
            ("conditioning", Dims::of(&[rows, d])),
            ("conditioning", Dims::of(&[rows, d])),
            ("modulations", Dims::of(&[cfg.depth, rows, 6, d])),
            ("final modulations", Dims::of(&[rows, 2, d])),
            ("final layer", Dims::of(&[rows, t, cfg.patch_out()])),
            ("output", Dims::of(&[rows, cfg.out_len()])),
            ("attention scores", Dims::of(&[tasks, t, t])),
        ]
    }

    /// Bytes of the buffers of a forward over `rows` model rows, None where they overflow.
    pub fn bytes(cfg: &DitConfig, rows: usize) -> Option<u64> {
        f32_bytes(Self::layout(cfg, rows).iter().map(|(_, d)| &**d))
    }

    /// Buffers for a forward of `rows` model rows (at least one); an error naming the largest
    /// buffer where they overflow or are more than this machine has free, before any is made.
    pub fn new(cfg: &DitConfig, rows: usize) -> Result<Activations> {
        ensure!(rows > 0, "a forward needs at least one row");
        let layout = Self::layout(cfg, rows);
        let context = || format!("the CPU forward of {rows} rows of {}", cfg.arch_name());
        let (largest, dims) = layout
            .iter()
            .max_by_key(|(_, dims)| f32_len(dims).unwrap_or(usize::MAX))
            .expect("the layout is not empty");
        let bytes = f32_bytes(layout.iter().map(|(_, d)| &**d))
            .with_context(|| format!("{largest}: {dims:?} elements overflow the address space"))
            .with_context(context)?;
        ensure_free_memory(
            &format!("{} buffers, the largest {largest} {dims:?}", layout.len()),
            bytes,
        )
        .with_context(context)?;
        let buffers = layout
            .iter()
            .map(|(what, dims)| zeros(what, dims).with_context(context))
            .collect::<Result<Vec<_>>>()?;
        let Ok(
            [patches, x, h, qkv, attn, mlp, attn_out, mlp_out, t_feat, t_hidden, c, silu_c, mods, final_mods, final_out, out, scores],
        ) = <[Vec<f32>; 17]>::try_from(buffers)
        else {
            unreachable!("one buffer for each of the layout's 17 entries")
        };
        Ok(Activations {
            rows,
            patches,
            x,
            h,
            qkv,
            attn,
            mlp,
            attn_out,
            mlp_out,
            t_feat,
            t_hidden,
            c,
            silu_c,
            mods,
            final_mods,
            final_out,
            out,
            scores,
        })
    }
    /// Model rows these buffers hold.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Checks that every buffer has its length for a forward of `cfg` over [`Self::rows`]
    /// (the fields are public: buffers of another model, or a resized one, are refused by
    /// name instead of indexed past their end).
    pub fn check(&self, cfg: &DitConfig) -> Result<()> {
        let lens = [
            self.patches.len(),
            self.x.len(),
            self.h.len(),
            self.qkv.len(),
            self.attn.len(),
            self.mlp.len(),
            self.attn_out.len(),
            self.mlp_out.len(),
            self.t_feat.len(),
            self.t_hidden.len(),
            self.c.len(),
            self.silu_c.len(),
            self.mods.len(),
            self.final_mods.len(),
            self.final_out.len(),
            self.out.len(),
        ];
        for ((what, dims), len) in Self::layout(cfg, self.rows).iter().zip(lens) {
            ensure!(
                f32_len(dims) == Some(len),
                "the CPU forward's {what} buffer holds {len} values where {} of {} rows \
                 take {dims:?}: buffers made for another model, or resized",
                cfg.arch_name(),
                self.rows
            );
        }
        // The scores scratch (private) was sized for its thread count when made.
        let square = cfg.tokens() * cfg.tokens();
        ensure!(
            self.scores.len() >= square && self.scores.len().is_multiple_of(square),
            "the CPU forward's attention scores hold {} values, not [tasks, {t}, {t}]: buffers \
             made for another model",
            self.scores.len(),
            t = cfg.tokens()
        );
        Ok(())
    }
}

/// The FORA cache of one batch of model rows: per layer the attention output (after proj) and
/// the MLP output (after fc2), before gate and residual.
pub struct FeatureCache {
    rows: usize,
    /// `[L, N*T, D]`.
    pub attn: Vec<f32>,
    /// `[L, N*T, D]`.
    pub mlp: Vec<f32>,
    /// True once a computing step has filled every layer.
    pub valid: bool,
}

impl FeatureCache {
    /// An empty (not yet valid) cache for `rows` model rows; an error where it cannot be
    /// allocated.
    pub fn new(cfg: &DitConfig, rows: usize) -> Result<FeatureCache> {
        let dims = Self::dims(cfg, rows);
        let context = || format!("the FORA cache of {rows} rows");
        let bytes = f32_bytes([dims.as_slice(); 2])
            .with_context(|| format!("{dims:?} elements overflow the address space"))
            .with_context(context)?;
        ensure_free_memory("attention and MLP outputs", bytes).with_context(context)?;
        let z = |what: &str| zeros(what, &dims).with_context(context);
        Ok(FeatureCache {
            rows,
            attn: z("attention outputs")?,
            mlp: z("MLP outputs")?,
            valid: false,
        })
    }
    /// Model rows this cache holds.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Checks that both buffers have their length for `cfg` over [`Self::rows`] (the fields are
    /// public: a cache of another model, or a resized one, is refused by name).
    pub fn check(&self, cfg: &DitConfig) -> Result<()> {
        let dims = Self::dims(cfg, self.rows);
        for (what, len) in [("attention", self.attn.len()), ("MLP", self.mlp.len())] {
            ensure!(
                f32_len(&dims) == Some(len),
                "the FORA cache's {what} outputs hold {len} values where {} of {} rows take \
                 {dims:?}: a cache made for another model, or resized",
                cfg.arch_name(),
                self.rows
            );
        }
        Ok(())
    }

    /// Dims of each of the two buffers: `[L, N*T, D]`.
    fn dims(cfg: &DitConfig, rows: usize) -> [usize; 4] {
        [cfg.depth, rows, cfg.tokens(), cfg.hidden]
    }

    /// Bytes of the cache of `rows` model rows, None where they overflow.
    pub fn bytes(cfg: &DitConfig, rows: usize) -> Option<u64> {
        f32_bytes([Self::dims(cfg, rows).as_slice(); 2])
    }
}

/// Checks inputs of one forward; allocates only to report an error.
pub fn check_inputs(cfg: &DitConfig, rows: usize, x: &[f32], t: &[i64], y: &[usize]) -> Result<()> {
    ensure!(
        x.len() == rows * cfg.image_len(),
        "input x has {} values, expected [{rows}, {}, {}, {}] = {}",
        x.len(),
        cfg.in_channels,
        cfg.input_size,
        cfg.input_size,
        rows * cfg.image_len()
    );
    ensure!(t.len() == rows, "got {} timesteps for {rows} rows", t.len());
    ensure!(y.len() == rows, "got {} labels for {rows} rows", y.len());
    let steps = crate::diffusion::DIFFUSION_STEPS as i64;
    if let Some((j, &bad)) = t
        .iter()
        .enumerate()
        .find(|(_, &v)| !(0..steps).contains(&v))
    {
        anyhow::bail!(
            "timestep t[{j}] = {bad} is outside the model's 0..{} (its diffusion's steps)",
            steps - 1
        );
    }
    if let Some(&bad) = y.iter().find(|&&l| l > cfg.num_classes) {
        anyhow::bail!(
            "label {bad} out of range: classes are 0..{} and {} is the null class",
            cfg.num_classes - 1,
            cfg.num_classes
        );
    }
    Ok(())
}

/// Patch embedding + position embedding into the residual stream `acts.x`.
pub fn embed_patches(
    cfg: &DitConfig,
    w: &DitWeights,
    acts: &mut Activations,
    x: &[f32],
    parallel: bool,
) {
    let (n, d, t) = (acts.rows, cfg.hidden, cfg.tokens());
    let feat = cfg.in_channels * cfg.patch * cfg.patch;
    ops::patchify(
        &mut acts.patches,
        x,
        n,
        cfg.in_channels,
        cfg.input_size,
        cfg.patch,
    );
    ops::linear_rows(
        &mut acts.x,
        &acts.patches,
        &w.x_embed_w,
        &w.x_embed_b,
        n * t,
        d,
        feat,
        parallel,
    );
    for row in acts.x.chunks_exact_mut(t * d) {
        for (v, p) in row.iter_mut().zip(&w.pos_embed) {
            *v += p;
        }
    }
}

/// Conditioning c = t_emb(t) + y_emb(y), then the modulations of every block and the final
/// layer from SiLU(c).
pub fn condition(
    cfg: &DitConfig,
    w: &DitWeights,
    acts: &mut Activations,
    t: &[i64],
    y: &[usize],
    parallel: bool,
) {
    let (n, d) = (acts.rows, cfg.hidden);
    ops::timestep_features(t, &mut acts.t_feat);
    ops::linear_rows(
        &mut acts.t_hidden,
        &acts.t_feat,
        &w.t_mlp0_w,
        &w.t_mlp0_b,
        n,
        d,
        FREQ_DIM,
        parallel,
    );
    acts.t_hidden.iter_mut().for_each(|v| *v = ops::silu(*v));
    ops::linear_rows(
        &mut acts.c,
        &acts.t_hidden,
        &w.t_mlp2_w,
        &w.t_mlp2_b,
        n,
        d,
        d,
        parallel,
    );
    for (r, &label) in y.iter().enumerate() {
        let emb = &w.y_table[label * d..(label + 1) * d];
        for (cv, e) in acts.c[r * d..(r + 1) * d].iter_mut().zip(emb) {
            *cv += e;
        }
    }
    for (s, &cv) in acts.silu_c.iter_mut().zip(&acts.c) {
        *s = ops::silu(cv);
    }
    for (l, b) in w.blocks.iter().enumerate() {
        let m = &mut acts.mods[l * n * 6 * d..(l + 1) * n * 6 * d];
        ops::linear_rows(m, &acts.silu_c, &b.ada_w, &b.ada_b, n, 6 * d, d, parallel);
    }
    ops::linear_rows(
        &mut acts.final_mods,
        &acts.silu_c,
        &w.final_ada_w,
        &w.final_ada_b,
        n,
        2 * d,
        d,
        parallel,
    );
}

/// Modulation chunk `j` (0 shift_msa .. 5 gate_mlp) of block `l`: the slice starting at row 0,
/// row stride 6D.
fn chunk(mods: &[f32], l: usize, n: usize, d: usize, j: usize) -> &[f32] {
    &mods[l * n * 6 * d + j * d..(l + 1) * n * 6 * d]
}

/// One full block: attention and MLP, each output stored in `attn_out` / `mlp_out` (the cache
/// slots or scratch) and added to the residual through its gate.
fn block(
    cfg: &DitConfig,
    w: &DitWeights,
    acts: &mut Activations,
    l: usize,
    attn_out: &mut [f32],
    mlp_out: &mut [f32],
) {
    let (n, d, t, m) = (acts.rows, cfg.hidden, cfg.tokens(), cfg.mlp_hidden());
    let nt = n * t;
    let b = &w.blocks[l];
    let mods = &acts.mods;
    ops::layernorm_modulate(
        &mut acts.h,
        &acts.x,
        chunk(mods, l, n, d, 0),
        chunk(mods, l, n, d, 1),
        6 * d,
        t,
        d,
        true,
    );
    ops::linear(&mut acts.qkv, &acts.h, &b.qkv_w, &b.qkv_b, nt, 3 * d, d);
    ops::attention(
        &mut acts.attn,
        &acts.qkv,
        &mut acts.scores,
        n,
        t,
        cfg.heads,
        cfg.head_dim(),
    );
    ops::linear(attn_out, &acts.attn, &b.proj_w, &b.proj_b, nt, d, d);
    ops::gate_residual(
        &mut acts.x,
        attn_out,
        chunk(mods, l, n, d, 2),
        6 * d,
        t,
        d,
        true,
    );
    ops::layernorm_modulate(
        &mut acts.h,
        &acts.x,
        chunk(mods, l, n, d, 3),
        chunk(mods, l, n, d, 4),
        6 * d,
        t,
        d,
        true,
    );
    ops::linear(&mut acts.mlp, &acts.h, &b.fc1_w, &b.fc1_b, nt, m, d);
    ops::gelu_tanh_inplace(&mut acts.mlp, true);
    ops::linear(mlp_out, &acts.mlp, &b.fc2_w, &b.fc2_b, nt, d, m);
    ops::gate_residual(
        &mut acts.x,
        mlp_out,
        chunk(mods, l, n, d, 5),
        6 * d,
        t,
        d,
        true,
    );
}

/// The reuse path of block `l`: `x += gate_msa * A_l; x += gate_mlp * M_l`.
pub fn reuse_block(cfg: &DitConfig, acts: &mut Activations, cache: &FeatureCache, l: usize) {
    let (n, d, t) = (acts.rows, cfg.hidden, cfg.tokens());
    let len = n * t * d;
    let (a, m) = (
        &cache.attn[l * len..(l + 1) * len],
        &cache.mlp[l * len..(l + 1) * len],
    );
    ops::gate_residual(
        &mut acts.x,
        a,
        chunk(&acts.mods, l, n, d, 2),
        6 * d,
        t,
        d,
        false,
    );
    ops::gate_residual(
        &mut acts.x,
        m,
        chunk(&acts.mods, l, n, d, 5),
        6 * d,
        t,
        d,
        false,
    );
}

/// Final layer: LayerNorm + modulate(shift, scale) + linear + unpatchify into `acts.out`.
pub fn final_layer(cfg: &DitConfig, w: &DitWeights, acts: &mut Activations, parallel: bool) {
    let (n, d, t) = (acts.rows, cfg.hidden, cfg.tokens());
    let fm = &acts.final_mods;
    ops::layernorm_modulate(&mut acts.h, &acts.x, fm, &fm[d..], 2 * d, t, d, parallel);
    ops::linear_rows(
        &mut acts.final_out,
        &acts.h,
        &w.final_w,
        &w.final_b,
        n * t,
        cfg.patch_out(),
        d,
        parallel,
    );
    ops::unpatchify(
        &mut acts.out,
        &acts.final_out,
        n,
        cfg.out_channels(),
        cfg.input_size,
        cfg.patch,
    );
}

/// One forward of `acts.rows()` rows into `acts.out`. `Compute` runs every block and fills
/// `cache` when given; `Reuse` needs a valid cache of the same rows. A reuse step allocates
/// nothing and runs on the calling thread only.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    cfg: &DitConfig,
    w: &DitWeights,
    acts: &mut Activations,
    cache: Option<&mut FeatureCache>,
    mode: StepMode,
    x: &[f32],
    t: &[i64],
    y: &[usize],
) -> Result<()> {
    let n = acts.rows;
    check_inputs(cfg, n, x, t, y)?;
    acts.check(cfg)?;
    if let Some(cache) = &cache {
        cache.check(cfg)?;
    }
    let parallel = mode == StepMode::Compute;
    match mode {
        StepMode::Compute => {
            embed_patches(cfg, w, acts, x, parallel);
            condition(cfg, w, acts, t, y, parallel);
            let len = n * cfg.tokens() * cfg.hidden;
            match cache {
                Some(cache) => {
                    ensure!(
                        cache.rows == n,
                        "FORA cache holds {} rows, the forward has {n}",
                        cache.rows
                    );
                    // Invalid until every layer is written (an error cannot happen midway,
                    // but the flag must never claim a partial cache).
                    cache.valid = false;
                    for l in 0..cfg.depth {
                        let a = &mut cache.attn[l * len..(l + 1) * len];
                        let m = &mut cache.mlp[l * len..(l + 1) * len];
                        block(cfg, w, acts, l, a, m);
                    }
                    cache.valid = true;
                }
                None => {
                    // Moved out for the loop so that `block` can borrow `acts` mutably.
                    let mut a = std::mem::take(&mut acts.attn_out);
                    let mut m = std::mem::take(&mut acts.mlp_out);
                    for l in 0..cfg.depth {
                        block(cfg, w, acts, l, &mut a, &mut m);
                    }
                    acts.attn_out = a;
                    acts.mlp_out = m;
                }
            }
        }
        StepMode::Reuse => {
            let Some(cache) = cache else {
                anyhow::bail!("a reuse step needs a FORA cache");
            };
            ensure!(
                cache.valid,
                "a reuse step needs a FORA cache filled by an earlier computing step"
            );
            ensure!(
                cache.rows == n,
                "FORA cache holds {} rows, the forward has {n}",
                cache.rows
            );
            embed_patches(cfg, w, acts, x, parallel);
            condition(cfg, w, acts, t, y, parallel);
            for l in 0..cfg.depth {
                reuse_block(cfg, acts, cache, l);
            }
        }
    }
    final_layer(cfg, w, acts, parallel);
    Ok(())
}

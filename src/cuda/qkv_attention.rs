//! Launcher of `qkv_attention_d64` / `qkv_attention_d72` and their `_mc_` variants
//! (`kernels/qkv_attention_sm90.cu`, Hopper only): the qkv Linear and the flash attention after
//! it in one launch. A cluster of four CTAs holds one (batch, head)'s sequence of at most 256
//! tokens, 64 a CTA: each computes its tokens' q, k and v of the head (a 64 x 3d GEMM over the
//! model width), pushes its K and V into every CTA of the cluster through distributed shared
//! memory and runs the wgmma attention of its 64 queries over the whole sequence. The qkv
//! activations never reach memory. For few token rows (one image + CFG), where the qkv GEMM and
//! the attention are two launches of mostly latency; [`QkvAttention::serves`] says where.

use super::device::{check_positive, check_ptr, KernelLauncher, TmaTensor2d};
use super::params::{AttentionParams, QkvAttentionParams, TmaDescriptor};
use anyhow::{ensure, Context, Result};

/// CTAs a cluster: one sequence of at most `QKV_ATTENTION_CLUSTER * 64` tokens.
pub const QKV_ATTENTION_CLUSTER: u32 = 4;
/// Tokens a CTA.
const ROWS: u32 = 64;
/// Most tokens a sequence (the cluster's).
pub const QKV_ATTENTION_MAX_TOKENS: usize = (QKV_ATTENTION_CLUSTER * ROWS) as usize;
/// Ring stages (qkv_attention_sm90.cu's QkvAttentionShape).
const STAGES: u32 = 4;
/// A consumer warpgroup and a producer warp.
const THREADS: u32 = 160;
/// k-depth of a ring slot (one 128-byte swizzle row of bf16).
const DEPTH: u32 = 64;

/// The kernel of `head_dim` (64, else 72), W multicast across the cluster or not.
fn kernel_name(head_dim: usize, multicast: bool) -> &'static str {
    match (head_dim, multicast) {
        (64, false) => "qkv_attention_d64",
        (64, true) => "qkv_attention_mc_d64",
        (_, false) => "qkv_attention_d72",
        (_, true) => "qkv_attention_mc_d72",
    }
}

/// Dynamic shared memory a CTA at `head_dim` (qkv_attention_sm90.cu's QkvAttentionShape, must
/// match): the ring, or after the GEMM the cluster's four K and four V tiles and the output
/// staging, whichever is larger; two mbarriers a stage; 1 KiB to align the base to 1024 bytes.
pub const fn qkv_attention_smem_bytes(head_dim: u32) -> u32 {
    let dk = head_dim.div_ceil(16) * 16;
    let panels = dk.div_ceil(64);
    let ring = STAGES * (ROWS * DEPTH * 2 + 3 * head_dim * DEPTH * 2);
    let kv = 2 * QKV_ATTENTION_CLUSTER * panels * ROWS * 128;
    let staging = ROWS * (dk + 8) * 2;
    let data = if ring > kv + staging {
        ring
    } else {
        kv + staging
    };
    data + STAGES * 16 + 1024
}

/// Whether a kernel exists for this head shape: head_dim 64 (DiT-S, B, L) or 72 (DiT-XL), at
/// most [`QKV_ATTENTION_MAX_TOKENS`] tokens (256 px DiT/2 and smaller).
pub fn qkv_attention_supports(head_dim: usize, tokens: usize) -> bool {
    (head_dim == 64 || head_dim == 72) && (1..=QKV_ATTENTION_MAX_TOKENS).contains(&tokens)
}

/// One launch: the qkv Linear of `a` (bf16 `[batch * tokens, heads * head_dim]`, rows `lda`
/// apart) with `w` and `bias`, then attention into `out` (device addresses).
#[derive(Clone, Copy, Debug)]
pub struct QkvAttention {
    /// bf16 `[batch * tokens, dim]` (the modulated LayerNorm), 16-byte aligned; dim = heads x
    /// head_dim.
    pub a: u64,
    /// Elements between rows of `a` (a multiple of 8, at least dim).
    pub lda: usize,
    /// bf16 `[3 * dim, dim]`: the qkv Linear's weight (q, k, v rows, heads within each).
    pub w: u64,
    /// f32 `[3 * dim]`.
    pub bias: u64,
    /// bf16 `[batch, tokens, heads, head_dim]`, 16-byte aligned.
    pub out: u64,
    /// Sequences (model rows).
    pub batch: usize,
    /// Tokens a sequence.
    pub tokens: usize,
    /// Attention heads.
    pub heads: usize,
    /// Head dimension (64 or 72).
    pub head_dim: usize,
    /// Softmax scale (1 / sqrt(head_dim)).
    pub scale: f32,
    /// The `_mc_` kernel: the four CTAs of a cluster (one head) share W's tiles, three of them
    /// loading the head's q, k and v rows and multicasting them to all four, so a W tile is read
    /// from L2 once a cluster instead of four times. The same results.
    pub multicast: bool,
}

impl QkvAttention {
    /// Model width: the product's depth and each of q's, k's and v's widths.
    pub fn dim(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Whether the model takes this launch on `sms` multiprocessors of compute capability `cc`
    /// (when enabled): a supported head shape, and the clusters' CTAs (four a sequence and head,
    /// one an SM for their shared memory) in one wave. Past that the qkv GEMM's larger tiles
    /// use the tensor cores better than these 64-token CTAs.
    pub fn serves(
        cc: (i32, i32),
        sms: usize,
        batch: usize,
        heads: usize,
        head_dim: usize,
        tokens: usize,
    ) -> bool {
        cc.0 == 9
            && qkv_attention_supports(head_dim, tokens)
            && batch * heads * QKV_ATTENTION_CLUSTER as usize <= sms
    }

    /// Checks everything the kernel relies on, on a device of `compute_capability`, with errors
    /// that name the field (the operands' tensor maps check A's and W's addresses and strides).
    pub fn validate(&self, compute_capability: (i32, i32)) -> Result<()> {
        let name = self.kernel();
        let (major, minor) = compute_capability;
        ensure!(
            major == 9,
            "{name}: needs a Hopper (sm_90a: wgmma, TMA, clusters); this device is sm_{major}{minor}"
        );
        check_positive(name, "batch", self.batch as i64)?;
        check_positive(name, "heads", self.heads as i64)?;
        ensure!(
            self.head_dim == 64 || self.head_dim == 72,
            "{name}: head_dim {} (built for 64 and 72)",
            self.head_dim
        );
        ensure!(
            (1..=QKV_ATTENTION_MAX_TOKENS).contains(&self.tokens),
            "{name}: {} tokens a sequence; a cluster of {QKV_ATTENTION_CLUSTER} CTAs holds 1 to \
             {QKV_ATTENTION_MAX_TOKENS}",
            self.tokens
        );
        let dim = self.dim();
        ensure!(
            self.lda >= dim && self.lda.is_multiple_of(8),
            "{name}: lda = {} must be at least dim {dim} and a multiple of 8 (16-byte TMA rows)",
            self.lda
        );
        ensure!(
            self.batch
                .checked_mul(self.tokens)
                .and_then(|m| m.checked_mul(self.lda))
                .is_some_and(|e| e <= i32::MAX as usize)
                && 3 * dim * dim <= i32::MAX as usize,
            "{name}: batch {} x tokens {} (lda {}) or dim {dim} beyond the kernel's 32-bit indices",
            self.batch,
            self.tokens,
            self.lda
        );
        ensure!(
            self.batch <= 65_535,
            "{name}: batch {} exceeds the grid's y dimension (65,535)",
            self.batch
        );
        ensure!(
            self.scale.is_finite() && self.scale > 0.0,
            "{name}: scale must be finite and > 0, got {}",
            self.scale
        );
        check_ptr(name, "bias", self.bias, 8)?;
        check_ptr(name, "out", self.out, 16)?;
        Ok(())
    }

    /// The kernel this launch runs.
    pub fn kernel(&self) -> &'static str {
        kernel_name(self.head_dim, self.multicast)
    }

    /// Clusters of the kernel of `head_dim` (W multicast or not) resident on `gpu` at once: the
    /// driver's count, where each cluster's four CTAs (one an SM) must share a GPC, so it can be
    /// less than the SMs / 4 that [`QkvAttention::serves`] assumes. 0 where the device refuses
    /// the kernel's shared memory or the query.
    pub fn resident_clusters(gpu: &impl KernelLauncher, head_dim: usize, multicast: bool) -> usize {
        let name = kernel_name(head_dim, multicast);
        let smem = qkv_attention_smem_bytes(head_dim as u32);
        if gpu.allow_dynamic_shared_memory(name, smem).is_err() {
            return 0;
        }
        gpu.max_active_clusters(name, QKV_ATTENTION_CLUSTER, THREADS, smem)
            .unwrap_or(0)
    }

    /// The kernel's parameters: the checks, then the operands' tensor maps.
    pub fn params(&self, gpu: &impl KernelLauncher) -> Result<QkvAttentionParams> {
        self.validate(gpu.compute_capability())?;
        let name = self.kernel();
        let dim = self.dim() as u64;
        let a_map: TmaDescriptor = gpu
            .tma_descriptor_2d(&TmaTensor2d {
                base: self.a,
                rows: (self.batch * self.tokens) as u64,
                cols: dim,
                row_stride: self.lda as u64,
                box_rows: ROWS,
                box_cols: DEPTH,
            })
            .with_context(|| format!("{name}: the tensor map of A"))?;
        let w_map = gpu
            .tma_descriptor_2d(&TmaTensor2d {
                base: self.w,
                rows: 3 * dim,
                cols: dim,
                row_stride: dim,
                box_rows: self.head_dim as u32,
                box_cols: DEPTH,
            })
            .with_context(|| format!("{name}: the tensor map of W"))?;
        Ok(QkvAttentionParams {
            a_map,
            w_map,
            bias: self.bias,
            attn: AttentionParams {
                qkv: 0,
                out: self.out,
                batch: self.batch as i32,
                tokens: self.tokens as i32,
                heads: self.heads as i32,
                head_dim: self.head_dim as i32,
                scale: self.scale,
            },
            dim: dim as i32,
        })
    }

    /// Launches the kernel: a cluster of four CTAs for each (batch, head).
    ///
    /// # Safety
    /// Every device address in the parameters must point to a live allocation of the launching
    /// context holding at least what the kernel reads or writes at the given sizes (the
    /// parameters' docs say how much); only null and misaligned addresses are refused here.
    pub unsafe fn launch(&self, gpu: &impl KernelLauncher) -> Result<()> {
        let params = self.params(gpu)?;
        let name = self.kernel();
        let smem = qkv_attention_smem_bytes(self.head_dim as u32);
        gpu.allow_dynamic_shared_memory(name, smem)?;
        let grid_x = (self.heads as u64) * QKV_ATTENTION_CLUSTER as u64;
        ensure!(
            grid_x <= i32::MAX as u64,
            "{name}: {} heads need too many CTAs",
            self.heads
        );
        // SAFETY: `params` checked the shapes, alignment and non-null pointers the kernel relies
        // on, and the tensor maps describe exactly A [batch * tokens, dim] and W [3 dim, dim];
        // the extents of bias [3 dim] and out [batch, tokens, heads, head_dim] are the caller's
        // contract, as for the qkv GEMM and the attention.
        unsafe {
            gpu.launch_kernel(
                name,
                (grid_x as u32, self.batch as u32, 1),
                (THREADS, 1, 1),
                smem,
                &params,
            )
        }
        .with_context(|| {
            format!(
                "launching {name} (batch={} tokens={} heads={} head_dim={})",
                self.batch, self.tokens, self.heads, self.head_dim
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resident_clusters_are_the_drivers_count() {
        use crate::cuda::device::FakeLauncher;
        let gpu = |smem_limit, clusters| FakeLauncher {
            smem_limit,
            non_portable: false,
            clusters,
        };
        assert_eq!(
            QkvAttention::resident_clusters(&gpu(227 * 1024, 31), 72, true),
            31
        );
        assert_eq!(
            QkvAttention::resident_clusters(&gpu(227 * 1024, 32), 64, false),
            32
        );
        // d 72's 144,448 bytes refused: none.
        assert_eq!(
            QkvAttention::resident_clusters(&gpu(140_000, 32), 72, true),
            0
        );
        assert_eq!(
            QkvAttention::resident_clusters(&gpu(140_000, 32), 64, true),
            32
        );
    }

    #[test]
    fn qkv_attention_shared_memory_matches_the_kernel() {
        // qkv_attention_sm90.cu's comment: d 72, four stages of (64 + 216) x 64 bf16 (143,360
        // B) over the K / V tiles and staging (131,072 + 11,264); d 64: 4 x 32 KiB.
        assert_eq!(qkv_attention_smem_bytes(72), 144_448);
        assert_eq!(qkv_attention_smem_bytes(64), 132_160);
        assert!(qkv_attention_smem_bytes(72) <= 227 * 1024);
    }

    #[test]
    fn qkv_attention_serves_one_wave_of_supported_shapes() {
        // DiT-XL/2 at 256 px, one image + CFG on 132 SMs: 2 x 16 x 4 = 128 CTAs.
        assert!(QkvAttention::serves((9, 0), 132, 2, 16, 72, 256));
        assert!(!QkvAttention::serves((9, 0), 132, 4, 16, 72, 256));
        assert!(!QkvAttention::serves((8, 0), 132, 2, 16, 72, 256));
        assert!(!QkvAttention::serves((9, 0), 132, 2, 16, 72, 1024));
        assert!(!QkvAttention::serves((9, 0), 132, 2, 16, 128, 256));
        assert!(qkv_attention_supports(64, 1) && !qkv_attention_supports(64, 0));
    }
}

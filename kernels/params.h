/* Kernel parameter structs: the single source of truth for the kernel ABI.
 * Included by every kernels/*.cu and turned into src/cuda/params.rs by bindgen (build.rs),
 * so the Rust launchers and the kernels cannot drift. Plain C: fixed-width fields, device
 * pointers as `unsigned long long` (CUdeviceptr) so bindgen emits u64 and nothing else.
 * Kernels take one struct by value. */
#ifndef FORA_PARAMS_H
#define FORA_PARAMS_H

#ifdef __cplusplus
extern "C" {
#endif

typedef unsigned long long fora_ptr; /* a CUdeviceptr */

/* GEMM epilogues. out = epilogue(A[M,K] @ W[N,K]^T + bias[N]) */
enum fora_gemm_epilogue {
    FORA_EPI_BIAS_BF16 = 0,      /* out bf16 [M, ldo] = acc + bias */
    FORA_EPI_BIAS_GELU_BF16 = 1, /* out bf16 = gelu_tanh(acc + bias) */
    FORA_EPI_BIAS_F32 = 2,       /* out f32 = acc + bias */
    /* v = acc + bias; if cache: cache bf16[m, n] = v; residual f32[m, n] += gate[m / rows_per_gate, n] * v */
    FORA_EPI_BIAS_GATE_RESIDUAL = 3,
    /* Internal to split-K (never valid from a caller): slice z = blockIdx.z of gridDim.z sums
     * its share of the k-tiles into out f32 [z][M, ldo] (no bias); gemm_epilogue_f32 then adds
     * the slices in order and applies the real epilogue. */
    FORA_EPI_PARTIAL_F32 = 4
};

typedef struct GemmParams {
    fora_ptr a;        /* bf16 [M, lda], row-major, K contiguous */
    fora_ptr w;        /* bf16 [N, ldw], row-major (PyTorch Linear weight [out, in]) */
    fora_ptr bias;     /* f32 [N] or 0 */
    fora_ptr out;      /* bf16 or f32 [M, ldo], per epilogue (the residual for GATE_RESIDUAL) */
    fora_ptr cache;    /* bf16 [M, ldc] or 0 (GATE_RESIDUAL only) */
    fora_ptr gate;     /* f32, gate of row m at gate[(m / rows_per_gate) * ldg + n] (GATE_RESIDUAL) */
    int m, n, k;
    int lda, ldw, ldo, ldc, ldg;
    int rows_per_gate;
    int epilogue;      /* enum fora_gemm_epilogue */
} GemmParams;

/* A TMA tensor map: CUDA's CUtensorMap, 128 opaque bytes. Aligned to 128 as CUDA 13's cuda.h
 * declares it (sm_90's TMA needs 64). The host fills it with cuTensorMapEncodeTiled (the CPU
 * emulator with its own encoder); a kernel takes it inside a __grid_constant__ parameter struct,
 * whose address the TMA instructions name. */
typedef struct __attribute__((aligned(128))) TmaDescriptor {
    unsigned long long opaque[16];
} TmaDescriptor;

/* The warp-specialized Hopper GEMM (gemm_tma_128x<BN> in gemm_sm90.cu): the GemmParams contract
 * (`gemm`), its operands loaded by TMA through two 2-D bf16 tensor maps with a 128-byte swizzle:
 *   a_map: A [M, K], row stride lda * 2 bytes, box 64 (k) x 128 (rows);
 *   w_map: W [N, K], row stride ldw * 2 bytes, box 64 (k) x BN (rows).
 * The grid is persistent: CTA b computes work units b, b + gridDim.x, ... of the
 * (split-K slice, M tile, N tile) units, N tile fastest. splits > 1 needs
 * gemm.epilogue = FORA_EPI_PARTIAL_F32 (slice z into out + z * M * ldo). */
typedef struct GemmTmaParams {
    TmaDescriptor a_map;
    TmaDescriptor w_map;
    GemmParams gemm;
    int splits;
} GemmTmaParams;

/* proj / fc2 on few token rows with its residual epilogue and the LayerNorm after it in one
 * launch (gemm_tma_ln_64x72, gemm_ln_sm90.cu): per token row m of model row r = m / tokens,
 *   v = A[m] @ W^T + bias (rounded to bf16 if round_v);  cache[m] = bf16(v) (when cache != 0);
 *   x[m] += gate_r * v;  out[m] = bf16(LN(x[m]) * (1 + scale_r) + shift_r)
 * (residual_layernorm's contract for an f32 product, or with round_v for the bf16 v of
 * FORA_BF16_RESIDUAL, the product computed here), gate_r /
 * shift_r / scale_r at modulation[r * ld_mod + gate_col / shift_col / scale_col + d]. W is
 * [dim, K]: a cluster of 16 CTAs covers a 64-row block of whole rows, each CTA dim / 16
 * columns. Operands by TMA, 128-byte swizzle: a_map A [M, K] box 64 (k) x 64 (rows), w_map
 * W [dim, K] box 64 (k) x dim / 16 (rows). dim, ld_mod and the columns even; K % 8 == 0. */
typedef struct GemmLayerNormParams {
    TmaDescriptor a_map;
    TmaDescriptor w_map;
    fora_ptr bias;     /* f32 [dim] */
    fora_ptr cache;    /* bf16 [M, dim] or 0 */
    fora_ptr x;        /* f32 [M, dim], updated in place */
    fora_ptr modulation; /* f32 [rows, ld_mod] */
    fora_ptr out;      /* bf16 [M, dim] */
    int m, k, dim, tokens;
    int ld_mod, gate_col, shift_col, scale_col;
    int round_v;       /* 1: the residual adds bf16(v), as a reuse step adds the cached v */
    float eps;         /* 1e-6 in DiT */
    /* FORA_PREFETCH_WEIGHTS: as in ResidualLayerNormParams (the next GEMMs' weights; bytes 0
       for none; a hint, no result depends on it). */
    fora_ptr prefetch_a, prefetch_b;
    long long prefetch_a_bytes, prefetch_b_bytes;
} GemmLayerNormParams;

/* The epilogue alone, over an f32 product acc[M, ld_acc] = A @ W^T (no bias) computed by another
 * GEMM (the cuBLASLt reference path, or the split-K slices of the custom one):
 * out = epilogue(sum of the slices + bias), same fields and meaning as in GemmParams.
 * Kernel gemm_epilogue_f32. */
typedef struct GemmEpilogueParams {
    fora_ptr acc;      /* f32 [M, ld_acc] */
    fora_ptr bias;     /* f32 [N] or 0 */
    fora_ptr out;
    fora_ptr cache;
    fora_ptr gate;
    int m, n;
    int ld_acc, ldo, ldc, ldg;
    int rows_per_gate;
    int epilogue;      /* enum fora_gemm_epilogue */
    int splits;        /* acc holds `splits` slices of [M, ld_acc], summed in order (>= 1) */
} GemmEpilogueParams;

/* Flash attention over a fused qkv buffer as the qkv Linear writes it:
 * qkv bf16 [B, T, 3, H, d] (row stride 3*H*d); out bf16 [B, T, H, d]. */
typedef struct AttentionParams {
    fora_ptr qkv;
    fora_ptr out;
    int batch, tokens, heads, head_dim;
    float scale;       /* 1 / sqrt(head_dim) */
} AttentionParams;

/* The persistent TMA flash attention (kernels attention_tma_d*, attention_sm90.cu, sm_90a): attn
 * as for every attention kernel; qkv_map: the TMA tensor map of attn.qkv as a bf16 matrix
 * [batch * tokens, 3 * heads * head_dim] (row stride the same), box 64 columns x 128 rows,
 * 128-byte swizzle. The grid is persistent: CTA c computes units c, c + gridDim.x, ... of the
 * (batch, head, 128-query block) units, query block fastest. */
typedef struct AttentionTmaParams {
    TmaDescriptor qkv_map;
    AttentionParams attn;
} AttentionTmaParams;

/* The qkv Linear and the flash attention after it in one launch (kernels qkv_attention_d64,
 * qkv_attention_d72 and their _mc_ variants, qkv_attention_sm90.cu, sm_90a), for few token rows:
 * qkv = bf16(A @ W^T + bias), as the qkv Linear writes it (here never stored), then attn's
 * contract, out bf16 [B, T, H, d] = softmax(q k^T * scale) v; attn.qkv is unused (0).
 * a_map: A bf16 [B * T, dim] (the modulated LayerNorm) box 64 (k) x 64 (rows); w_map: W bf16
 * [3 * dim, dim] (the qkv weight) box 64 (k) x d (rows); both 128-byte swizzle. dim = H * d,
 * T <= 256 (a cluster of four CTAs of 64 tokens holds a sequence), dim % 8 == 0. */
typedef struct QkvAttentionParams {
    TmaDescriptor a_map;
    TmaDescriptor w_map;
    fora_ptr bias;     /* f32 [3 * dim] */
    AttentionParams attn;
    int dim;
} QkvAttentionParams;

/* ---- small kernels (conditioning.cu, embed.cu, norm.cu, fora.cu, sampler.cu) ------------- */

/* Sinusoidal timestep embedding of the ORIGINAL timesteps (official DiT, max period 10000):
 * out[r] = cat[cos(t_r * f), sin(t_r * f)], f_j = exp(-ln(10000) * j / half), j < half.
 * Kernel timestep_embedding. */
typedef struct TimestepEmbedParams {
    fora_ptr t;        /* f32 [rows] */
    fora_ptr out;      /* bf16 [rows, ldo], columns 0 .. 2*half */
    int rows;
    int half;          /* 128 in DiT */
    int ldo;
} TimestepEmbedParams;

/* out bf16 [rows, ldo] = silu(in f32 [rows, ld_in]), the t-MLP's inner activation.
 * Kernel silu_f32_bf16. */
typedef struct SiluParams {
    fora_ptr input;    /* f32 [rows, ld_in] */
    fora_ptr out;      /* bf16 [rows, ldo] */
    int rows, cols, ld_in, ldo;
} SiluParams;

/* c = t_emb[r] + table[labels[r]] (f32); out bf16 [rows, ldo] = silu(c), the input of every
 * adaLN Linear. Labels are validated on the host; the kernel clamps into [0, num_labels).
 * Kernel label_silu. */
typedef struct LabelSiluParams {
    fora_ptr t_emb;    /* f32 [rows, ld_t] (the t-MLP output) */
    fora_ptr labels;   /* int32 [rows] */
    fora_ptr table;    /* f32 [num_labels, dim] (num_classes + 1 rows; the last is the null class) */
    fora_ptr out;      /* bf16 [rows, ldo] */
    int rows, dim, ld_t, ldo, num_labels;
} LabelSiluParams;

/* Patch embedding (the conv with kernel = stride = p as a dot product over C*p*p) + bias +
 * pos_embed -> the f32 residual stream. Model row r reads image r % images, so the CFG batch
 * [x; x] is never materialized. Kernel patch_embed. */
typedef struct PatchEmbedParams {
    fora_ptr latents;  /* f32 [images, C, H, W] */
    fora_ptr weight_t; /* f32 [C*p*p, dim]: the conv weight [dim, C, p, p] flattened, transposed */
    fora_ptr bias;     /* f32 [dim] */
    fora_ptr pos;      /* f32 [T, dim], T = (H/p) * (W/p) */
    fora_ptr out;      /* f32 [rows * T, dim] */
    int images, rows, channels, height, width, patch, dim;
} PatchEmbedParams;

/* LayerNorm (eps, no affine, f32 statistics) + modulate: out = LN(x) * (1 + scale) + shift,
 * shift/scale of model row r = modulation[r * ld_mod + shift_col + d], ..[.. + scale_col + d];
 * the `tokens` consecutive token rows of a model row share them. Kernel layernorm_modulate. */
typedef struct LayerNormModulateParams {
    fora_ptr x;        /* f32 [rows * tokens, dim] */
    fora_ptr modulation; /* f32 [rows, ld_mod] (the adaLN modulation table) */
    fora_ptr out;      /* bf16 [rows * tokens, dim] */
    int rows, tokens, dim;
    int ld_mod, shift_col, scale_col;
    float eps;         /* 1e-6 in DiT */
} LayerNormModulateParams;

/* The residual epilogue of proj / fc2 on the cuBLASLt path fused with the LayerNorm that follows
 * it, per token row m of model row r = m / tokens (one pass instead of gemm_epilogue_f32 and
 * layernorm_modulate):
 *   v = acc[m] + bias;  cache[m] = bf16(v) (when cache != 0);  x[m] += gate_r * v
 *   out[m] = bf16(LN(x[m]) * (1 + scale_r) + shift_r)
 * gate_r / shift_r / scale_r at modulation[r * ld_mod + gate_col / shift_col / scale_col + d].
 * With acc_bf16 = 1 the GEMM wrote v = bf16(product + bias) itself (into the FORA cache, say):
 * acc is bf16 and holds v, bias and cache must be 0, and x[m] += gate_r * v as the reuse step
 * adds the cached v.
 * Needs dim % 4 == 0 and dim <= 1536. Kernels residual_layernorm, residual_layernorm_w4. */
typedef struct ResidualLayerNormParams {
    fora_ptr acc;      /* f32 [rows * tokens, ld_acc]: the GEMM product, bias not added; or,
                          with acc_bf16, bf16 v */
    fora_ptr bias;     /* f32 [dim]; 0 with acc_bf16 */
    fora_ptr cache;    /* bf16 [rows * tokens, dim] or 0 */
    fora_ptr x;        /* f32 [rows * tokens, dim], updated in place */
    fora_ptr modulation; /* f32 [rows, ld_mod] */
    fora_ptr out;      /* bf16 [rows * tokens, dim] */
    int rows, tokens, dim, ld_acc;
    int ld_mod, gate_col, shift_col, scale_col;
    int acc_bf16;      /* 0: f32 product + bias; 1: bf16 v */
    float eps;         /* 1e-6 in DiT */
    /* f32 product only: the product is the sum, in order, of acc_splits > 1 split-K slices
       acc + s * acc_split_stride (elements), s = 0 .. acc_splits - 1; 0 or 1: one. */
    int acc_splits;
    long long acc_split_stride;
    /* FORA_PREFETCH_WEIGHTS: up to two ranges (the next GEMMs' weights) this pass asks L2 to
       fetch while it runs, each CTA its share: bytes 0 (and pointer 0) for none, else a
       16-byte aligned pointer and a multiple of 16 bytes. A hint: no result depends on it. */
    fora_ptr prefetch_a, prefetch_b;
    long long prefetch_a_bytes, prefetch_b_bytes;
} ResidualLayerNormParams;

/* FORA reuse step: for l in 0..layers, in order, in f32:
 *   x += gate_msa_l * A_l;  x += gate_mlp_l * M_l
 * A_l = cache + (2l) * slab, M_l = cache + (2l + 1) * slab (bf16 [rows * tokens, dim] each);
 * gate_msa_l of model row r = modulation[r * ld_mod + l * layer_cols + gate_msa_col + d] (likewise mlp).
 * Kernel fora_reuse. */
typedef struct ForaReuseParams {
    fora_ptr x;        /* f32 [rows * tokens, dim], updated in place */
    fora_ptr cache;    /* bf16 [layers][2][slab] */
    fora_ptr modulation; /* f32 [rows, ld_mod] */
    long long slab;    /* elements between consecutive cache slabs, >= rows * tokens * dim */
    int rows, tokens, dim, layers;
    int ld_mod;
    int layer_cols;    /* 6 * dim */
    int gate_msa_col;  /* 2 * dim */
    int gate_mlp_col;  /* 5 * dim */
} ForaReuseParams;

/* The whole FORA reuse forward up to the final Linear, in one launch, per token row:
 *   x = patch_embed(latents) + pos                  (as PatchEmbedParams, same f32 operations)
 *   for l in 0..layers: x += gate_msa_l * A_l; x += gate_mlp_l * M_l   (as ForaReuseParams)
 *   out = LN(x) * (1 + scale) + shift               (as LayerNormModulateParams; bf16)
 * the final layer's shift/scale at columns shift_col / scale_col of the modulation table.
 * x itself is written only when `x` is not 0 (the next step starts from a new embedding).
 * With final_w not 0 the final Linear follows in the same pass instead of writing `out`:
 *   final_out[token, o] = sum_d bf16(out[token, d]) * final_w[o, d] + final_b[o]   (f32)
 * for o < n_out <= 32 (needs dim > 128: a token row spans whole warps).
 * Needs dim % 8 == 0, dim <= 2048 and C*p*p <= 64 (every DiT). Kernels fora_reuse_final (one
 * token row a thread group) and fora_reuse_final_t4 (four).
 * fora_sum_final takes the layers' sum precomputed by fora_cache_sum instead of the cache:
 *   x = (patch_embed(latents) + pos) + sum         (one f32 add; cache, layers and gates unused)
 * and the same LayerNorm, modulate and optional final Linear. */
typedef struct ForaReuseFinalParams {
    fora_ptr latents;    /* f32 [images, C, H, W] */
    fora_ptr embed_weight_t; /* f32 [C*p*p, dim] (the conv weight, transposed) */
    fora_ptr embed_bias; /* f32 [dim] */
    fora_ptr pos;        /* f32 [T, dim] */
    fora_ptr cache;      /* bf16 [layers][2][slab]; unused by fora_sum_final */
    fora_ptr sum;        /* fora_sum_final only: f32 [rows * T, dim], the step's cache sum */
    fora_ptr modulation; /* f32 [rows, ld_mod] */
    fora_ptr out;        /* bf16 [rows * T, dim]; unused with final_w */
    fora_ptr x;          /* f32 [rows * T, dim] or 0 */
    fora_ptr final_w;    /* bf16 [n_out, dim] (final_layer.linear.weight) or 0 */
    fora_ptr final_b;    /* f32 [n_out] */
    fora_ptr final_out;  /* f32 [rows * T, n_out] */
    long long slab;      /* elements between consecutive cache slabs, >= rows * T * dim */
    int images, rows, channels, height, width, patch, dim, layers;
    int ld_mod;
    int layer_cols;      /* 6 * dim */
    int gate_msa_col;    /* 2 * dim */
    int gate_mlp_col;    /* 5 * dim */
    int shift_col, scale_col; /* the final layer's: layers * 6 * dim, + dim */
    int n_out;           /* p*p*out_channels with final_w, else unused */
    float eps;           /* 1e-6 in DiT */
} ForaReuseFinalParams;

/* The cache sums of a run of reuse steps: the residual updates of a reuse step are linear in
 * the cache, x_final = x_embed + sum_l (gate_msa_l * A_l + gate_mlp_l * M_l), so for the next
 * `count` reuse steps (step r's modulation table at tables + r * table_stride) one pass over
 * the cache computes, per token row and channel,
 *   sums[r] = 0; for l in 0..layers: sums[r] += gate_msa_l^r * A_l; sums[r] += gate_mlp_l^r * M_l
 * (f32, each product and sum rounded on its own, layer order) at sums + r * sum_stride, and
 * each of those steps then reads its sum (fora_sum_final) instead of the whole cache.
 * Needs dim % 8 == 0, 1 <= count <= 4. Kernels fora_cache_sum_1 .. fora_cache_sum_4 (count). */
typedef struct ForaCacheSumParams {
    fora_ptr cache;         /* bf16 [layers][2][slab] */
    fora_ptr tables;        /* f32 [count] x [rows, ld_mod] at table_stride */
    fora_ptr sums;          /* f32 [count] x [rows * tokens, dim] at sum_stride */
    long long slab;         /* elements between consecutive cache slabs, >= rows * tokens * dim */
    long long table_stride; /* elements between consecutive steps' tables, >= rows * ld_mod */
    long long sum_stride;   /* elements between consecutive sums, >= rows * tokens * dim */
    int rows, tokens, dim, layers;
    int ld_mod;
    int layer_cols;         /* 6 * dim */
    int gate_msa_col;       /* 2 * dim */
    int gate_mlp_col;       /* 5 * dim */
    int count;
} ForaCacheSumParams;

enum fora_sampler_kind { FORA_SAMPLER_DDPM = 0, FORA_SAMPLER_DDIM = 1 };

/* One sampler update over the latents, reading the final Linear's output in token layout:
 * model value (row n, channel ch, y, x) = model_out[(n * T + (y/p) * (W/p) + x/p) * p*p*out_channels
 *                                                  + ((y%p) * p + x%p) * out_channels + ch]
 * (unpatchify, einsum nhwpqc->nchpwq). With rows == 2 * images, image b's conditional row is b and
 * its unconditional row b + images; model-output channels [0, guided_channels) are combined as
 * uncond + cfg_scale * (cond - uncond), the others keep the conditional value. Then the DDPM or
 * DDIM update of src/backend.rs (StepUpdate) in f32, noise z from the `noise` buffer or, when it
 * is 0, Philox normal(seed, noise_stream, flat index in [images, C, H, W]) (src/rng.rs).
 * Kernel sampler_step.
 * Kernel final_sampler_step: the same update, its model output computed in the kernel by the
 * model's final Linear, model_out[r, j] = final_b[j] + sum_k xn[r, k] * final_w[j, k] (f32
 * accumulation), from the final LayerNorm + modulate `xn`; model_out is not read. dim % 32 == 0,
 * p*p*out_channels a multiple of 8 up to 64, xn and final_w 16-byte aligned. */
typedef struct SamplerStepParams {
    fora_ptr model_out; /* f32 [rows * T, p*p*out_channels] (sampler_step) */
    fora_ptr x;         /* f32 [images, C, H, W], updated in place */
    fora_ptr noise;     /* f32 [images, C, H, W] or 0 (Philox) */
    unsigned long long seed;
    unsigned long long noise_stream;
    int images, rows, channels, out_channels, height, width, patch;
    int guided_channels; /* 0 without guidance; 3 official, C all-eps */
    float cfg_scale;
    int kind;            /* enum fora_sampler_kind */
    int add_noise;
    int learn_sigma;     /* v (channel C + c) sets the log variance; else log_var = max_log */
    /* StepUpdate's f64 coefficients cast to f32, as diffusion::apply_update does */
    float sqrt_recip_abar, sqrt_recipm1_abar;
    float post_coef1, post_coef2, max_log, min_log; /* DDPM */
    float sqrt_abar_prev, dir_coef, sigma;          /* DDIM: sqrtf(abar_prev), sqrtf(1 - abar_prev - sigma^2) */
    /* final_sampler_step only (0 for sampler_step) */
    fora_ptr xn;        /* bf16 [rows * T, dim]: the final LayerNorm + modulate */
    fora_ptr final_w;   /* bf16 [p*p*out_channels, dim] */
    fora_ptr final_b;   /* f32 [p*p*out_channels] */
    int dim;
} SamplerStepParams;

/* Unpatchify the final Linear's output into images (the plain forward): out [rows, out_channels,
 * H, W] f32. With guided_channels > 0 it is forward_with_cfg: rows = 2 * half, channels
 * [0, guided_channels) of rows n and n + half both become uncond + cfg_scale * (cond - uncond) of
 * rows (n, n + half), n < half. Kernel unpatchify. */
typedef struct UnpatchifyParams {
    fora_ptr model_out; /* f32 [rows * T, p*p*out_channels] */
    fora_ptr out;       /* f32 [rows, out_channels, H, W] */
    int rows, out_channels, height, width, patch;
    int guided_channels;
    float cfg_scale;
} UnpatchifyParams;

/* out[i] = normal(seed, stream, i), i < n (src/rng.rs: Philox4x32-10 + Box-Muller); x_T is
 * stream 0. Kernel normal_fill. */
typedef struct NormalFillParams {
    fora_ptr out;       /* f32 [n] */
    unsigned long long seed;
    unsigned long long stream;
    long long n;
} NormalFillParams;

/* A hardware-contract probe of Hopper wgmma (kernel wgmma_probe: one warpgroup, sm_90a), two
 * k-steps of 16:
 *   d[64, n] = a[64, 32] @ b[32, n]   in f32, a bf16 row-major, b given transposed as bt[n, 32]
 * mode 0: A from registers (the RS form attention_sm90.cu uses), B K-major 128-byte swizzled;
 * mode 1: A and B from shared memory, both K-major (the SS form gemm_sm90.cu uses; n = 128);
 * mode 2: A from registers, B MN-major 128-byte swizzled (the transpose-B bit).
 * n is 64, 72 or 128. d is f32 row-major [64, n]. */
typedef struct WgmmaProbeParams {
    fora_ptr a;         /* bf16 [64, 32] */
    fora_ptr bt;        /* bf16 [n, 32] */
    fora_ptr d;         /* f32 [64, n] */
    int n, mode;
} WgmmaProbeParams;

/* A hardware-contract probe of TMA and the mbarrier (kernel tma_probe: one warpgroup, sm_90a):
 * thread 0 loads the box at (x0, y0) of `map` into 1024-byte-aligned shared memory through one
 * mbarrier (phase 0), every thread copies the shared bytes to out[0]; then the box at (x1, y1)
 * into the same place (phase 1) to out[1]. map: a bf16 tensor, box 64 x box_rows, 128-byte
 * swizzle, as the TMA GEMM uses it; out: bf16 [2][box_rows * 64], shared memory byte for byte. */
typedef struct TmaProbeParams {
    TmaDescriptor map;
    fora_ptr out;
    int x0, y0, x1, y1;
    int box_rows;
} TmaProbeParams;

/* Memory-bandwidth probes for the bench's ceilings, over `chunks` 16-byte chunks of src
 * (grid-stride, several chunks in flight a thread). Kernel bandwidth_read: dst is uint32
 * [out_words], out_words >= the launch's threads; thread i writes the XOR of every 32-bit word
 * it read to dst[i] (so no load is dead, and the XOR of dst is the XOR of src, whatever the
 * grid). bandwidth_read reads chunk i at src[i & mask]: mask -1 (all ones) reads src once; mask
 * = 2^k - 1 (k >= 0) reads a buffer of 2^k chunks over and over (chunks / 2^k times), the L2
 * probe. Kernel bandwidth_copy: dst[0, 16 * chunks) = src[0, 16 * chunks) (out_words unused,
 * mask -1). */
typedef struct BandwidthParams {
    fora_ptr src;
    fora_ptr dst;
    long long chunks;
    long long out_words;
    long long mask;
} BandwidthParams;

/* The bench's stream hold: one thread spins until `ns` nanoseconds of the GPU's global timer
 * have passed since it started, so that the host can enqueue a whole step op by op behind it
 * and the step then runs back to back, as from a graph (`fora bench --sections ops`). Kernel
 * hold_stream. */
typedef struct HoldParams {
    long long ns;
} HoldParams;

/* ---- the VAE decoder (kernels/vae.cu, src/cuda/vae.rs) --------------------------------------
 * Activations are f32 channels-last, [images, height, width, channels]; the convolutions are
 * cuBLASLt GEMMs over an unfolded input. */

/* Unfolds x f32 [images, sh, sw, channels] for a kernel x kernel convolution (kernel 1 or 3, zero
 * padding kernel / 2) at output size height x width, where (sh, sw) = (height, width), or half of
 * them with upsample = 1 (nearest 2x upsampling read through): cols bf16 [pixels, ldc], row r
 * being output pixel first + r of the images * height * width, its columns (ky, kx, c) and then
 * zeros up to ldc (a multiple of 8, for cuBLASLt). Kernel vae_unfold. */
typedef struct VaeUnfoldParams {
    fora_ptr x;         /* f32 [images, sh, sw, channels] */
    fora_ptr cols;      /* bf16 [pixels, ldc] */
    long long first, pixels;
    int images, height, width, channels;
    int kernel, upsample, ldc;
} VaeUnfoldParams;

/* n elements: kernel vae_cast_bf16 writes y bf16 [n] = x f32 [n]; kernel vae_add adds x f32 [n]
 * into y f32 [n]. */
typedef struct VaeElementwiseParams {
    fora_ptr x;
    fora_ptr y;
    long long n;
} VaeElementwiseParams;

/* GroupNorm of x f32 [images, pixels, channels] into y (may be x) with per-channel weight and
 * bias f32 [channels], then SiLU where silu = 1, in three kernels: vae_group_stats (grid
 * (chunks, images), 256 threads; channels % 256 == 0 or 256 % channels == 0) sums each chunk of
 * pixels into partials f64 [images, chunks, groups, 2] (sum, sum of squares); vae_group_finalize
 * (grid images, one thread a group) turns them into stats f32 [images, groups, 2] (mean,
 * 1 / sqrt(biased variance + eps)); vae_group_apply normalizes every element. */
typedef struct VaeGroupNormParams {
    fora_ptr x, y;
    fora_ptr partials;  /* f64 [images, chunks, groups, 2] */
    fora_ptr stats;     /* f32 [images, groups, 2] */
    fora_ptr weight, bias;
    long long pixels;   /* a image */
    int images, channels, groups, chunks, silu;
    float eps;
} VaeGroupNormParams;

/* Row-wise softmax of scores f32 [rows, ld] times scale into probs bf16 [rows, ld]:
 * exp(scale (s - max)) / sum over columns [0, cols), and 0 in columns [cols, ld) (padding that
 * keeps cuBLASLt's rows 16-byte aligned). One block a row. Kernel vae_softmax. */
typedef struct VaeSoftmaxParams {
    fora_ptr scores;
    fora_ptr probs;
    long long rows;
    int cols, ld;
    float scale;
} VaeSoftmaxParams;

#ifdef __cplusplus
}
#endif
#endif

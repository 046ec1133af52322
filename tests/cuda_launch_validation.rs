//! CPU-only checks of the small kernels' launchers: every launch name exists in the embedded
//! kernels, valid parameters plan the expected grid, and bad ones are refused with a clear error
//! before anything reaches a device. Runs everywhere (no GPU needed).

use fora::cuda::conditioning::{label_silu_plan, silu_plan, timestep_embedding_plan};
use fora::cuda::embed::patch_embed_plan;
use fora::cuda::fora::{
    fora_cache_sum_plan, fora_reuse_final_plan, fora_reuse_plan, fora_sum_final_plan,
    fused_reuse_unsupported, ReuseTokens,
};
use fora::cuda::kernels;
use fora::cuda::norm::{layernorm_modulate_plan, residual_layernorm_plan};
use fora::cuda::params::*;
use fora::cuda::sampler::{
    final_sampler_step_plan, final_sampler_supported, normal_fill_plan, sampler_step_plan,
    set_update, unpatchify_plan, update_kernel, update_plan,
};
use fora::diffusion::{Diffusion, SamplerKind};

/// A plausible, 256-byte aligned device address.
const P: u64 = 0x7f00_0000_0000;

fn err<T: std::fmt::Debug>(r: anyhow::Result<T>) -> String {
    format!(
        "{:#}",
        r.expect_err("expected the launcher to refuse these parameters")
    )
}

/// Each of `names` is an entry function of an embedded module, and its name is in the module's
/// bytes (fatbins keep entry names as plain strings: a typo in a launcher's name fails here).
/// SKIP without kernels.
fn assert_embedded<'a>(test: &str, names: impl IntoIterator<Item = &'a str>) {
    if !kernels::available() {
        println!(
            "SKIP {test}: built without kernels ({})",
            kernels::MISSING_REASON
        );
        return;
    }
    assert!(kernels::ARCHS.contains(&"sm_80") && kernels::ARCHS.contains(&"sm_90a"));
    for name in names {
        let found = kernels::MODULES.iter().any(|(_, bytes, entries)| {
            entries.contains(&name) && bytes.windows(name.len()).any(|w| w == name.as_bytes())
        });
        assert!(found, "kernel {name} is in no embedded module");
    }
}

#[test]
fn every_small_kernel_is_embedded() {
    assert_embedded(
        "every_small_kernel_is_embedded",
        [
            "timestep_embedding",
            "silu_f32_bf16",
            "label_silu",
            "patch_embed",
            "layernorm_modulate",
            "residual_layernorm",
            "fora_reuse",
            "fora_reuse_final",
            "fora_sum_final",
            "fora_sum_final_t4",
            "fora_cache_sum_1",
            "fora_cache_sum_2",
            "fora_cache_sum_3",
            "fora_cache_sum_4",
            "sampler_step",
            "final_sampler_step",
            "unpatchify",
            "normal_fill",
        ],
    );
}

/// Every TMA GEMM tile's kernel (the cluster-multicast ones included) and the Hopper probes are
/// embedded, by the name their launchers use.
#[test]
fn every_hopper_kernel_is_embedded() {
    assert_embedded(
        "every_hopper_kernel_is_embedded",
        fora::cuda::gemm::TmaTile::ALL
            .map(|t| t.kernel_name())
            .into_iter()
            .chain(["wgmma_probe", "tma_probe", "tma_cluster_probe"])
            .chain(
                fora::cuda::gemm_ln::GemmLnTile::ALL
                    .into_iter()
                    .flat_map(|t| [t.kernel_name(false), t.kernel_name(true)]),
            )
            .chain(qkv_attention_kernels()),
    );
}

/// The fused qkv + attention's kernels, by the names its launcher picks (head_dim 64 and 72,
/// W multicast or not).
fn qkv_attention_kernels() -> Vec<&'static str> {
    let mut names = Vec::new();
    for head_dim in [64, 72] {
        for multicast in [false, true] {
            names.push(
                fora::cuda::qkv_attention::QkvAttention {
                    head_dim,
                    multicast,
                    ..good_qkv_attention()
                }
                .kernel(),
            );
        }
    }
    names
}

/// One image + CFG of DiT-XL/2 at 256 px.
fn good_qkv_attention() -> fora::cuda::qkv_attention::QkvAttention {
    fora::cuda::qkv_attention::QkvAttention {
        a: P,
        lda: 1152,
        w: P,
        bias: P,
        out: P,
        batch: 2,
        tokens: 256,
        heads: 16,
        head_dim: 72,
        scale: 1.0 / 72f32.sqrt(),
        multicast: true,
    }
}

/// The fused qkv + attention launcher (`QkvAttention`) accepts one image + CFG of DiT-XL/2 on
/// a Hopper and refuses, naming the problem, another architecture, a head_dim without a kernel,
/// a sequence longer than a cluster holds, no rows, a bad A stride, a bad scale, and null or
/// misaligned pointers.
#[test]
fn qkv_attention_checks_shapes_and_pointers() {
    use fora::cuda::qkv_attention::QkvAttention;
    let good = good_qkv_attention();
    let hopper = (9, 0);
    good.validate(hopper).unwrap();
    assert_eq!(good.kernel(), "qkv_attention_mc_d72");
    assert!(err(good.validate((8, 9))).contains("needs a Hopper"));
    let bad = |b: QkvAttention| err(b.validate(hopper));
    assert!(bad(QkvAttention {
        head_dim: 128,
        ..good
    })
    .contains("head_dim 128"));
    assert!(bad(QkvAttention {
        tokens: 257,
        ..good
    })
    .contains("257 tokens"));
    assert!(bad(QkvAttention { tokens: 0, ..good }).contains("0 tokens"));
    assert!(bad(QkvAttention { batch: 0, ..good }).contains("batch must be > 0"));
    assert!(bad(QkvAttention { lda: 1100, ..good }).contains("lda = 1100"));
    assert!(bad(QkvAttention { lda: 1156, ..good }).contains("lda = 1156"));
    assert!(bad(QkvAttention {
        scale: f32::NAN,
        ..good
    })
    .contains("scale"));
    assert!(bad(QkvAttention { bias: 0, ..good }).contains("bias pointer is null"));
    assert!(bad(QkvAttention { out: P + 8, ..good }).contains("out pointer"));
    // Padded A rows are fine.
    QkvAttention { lda: 1160, ..good }.validate(hopper).unwrap();
}

/// The fused proj / fc2 + LayerNorm launcher (`GemmLayerNorm`) accepts one image + CFG of
/// DiT-XL/2 on a Hopper and refuses, naming the problem, another architecture, another row
/// width, a K the TMA rows cannot take, odd table columns, a table row too short, null or
/// misaligned pointers, a bad eps and a bad prefetch range.
#[test]
fn gemm_layernorm_checks_shapes_columns_and_pointers() {
    use fora::cuda::gemm_ln::{GemmLayerNorm, GemmLnTile};
    let d = 1152;
    let good = GemmLayerNorm {
        a: P,
        w: P,
        lda: d,
        ldw: d,
        bias: P,
        cache: P,
        x: P,
        modulation: P,
        out: P,
        m: 512,
        k: d,
        dim: d,
        tokens: 256,
        ld_mod: 28 * 6 * d + 2 * d,
        gate_col: 2 * d,
        shift_col: 3 * d,
        scale_col: 4 * d,
        round_v: true,
        eps: 1e-6,
        one_per_sm: false,
        multicast: true,
        tile: GemmLnTile::Rows64,
        prefetch: [(P, 1 << 20), (0, 0)],
    };
    let hopper = (9, 0);
    good.validate(hopper).unwrap();
    assert_eq!(good.kernel(), "gemm_tma_ln_mc_64x72");
    // The many-rows tile: the same checks, its own kernels.
    let many = GemmLayerNorm {
        m: 65536,
        tile: GemmLnTile::Rows128,
        ..good
    };
    many.validate(hopper).unwrap();
    assert_eq!(many.kernel(), "gemm_tma_ln_mc_128x72");
    assert_eq!(
        GemmLayerNorm {
            multicast: false,
            ..many
        }
        .kernel(),
        "gemm_tma_ln_128x72"
    );
    assert!(err(many.validate((8, 0))).contains("needs a Hopper"));
    assert!(err(GemmLayerNorm { dim: 1024, ..many }.validate(hopper)).contains("rows of 1024"));
    // The wide many-rows tile (clusters of 8 of 144 columns): its own kernels, its cluster named.
    let wide = GemmLayerNorm {
        tile: GemmLnTile::Wide128,
        ..many
    };
    wide.validate(hopper).unwrap();
    assert_eq!(wide.kernel(), "gemm_tma_ln_mc_128x144");
    assert_eq!(
        GemmLayerNorm {
            multicast: false,
            ..wide
        }
        .kernel(),
        "gemm_tma_ln_128x144"
    );
    assert!(err(GemmLayerNorm { dim: 1024, ..wide }.validate(hopper)).contains("8 CTAs of 144"));
    assert!(err(good.validate((8, 0))).contains("needs a Hopper"));
    let bad = |b: GemmLayerNorm| err(b.validate(hopper));
    assert!(bad(GemmLayerNorm { dim: 1024, ..good }).contains("rows of 1024 columns"));
    assert!(bad(GemmLayerNorm { m: 0, ..good }).contains("m must be > 0"));
    assert!(bad(GemmLayerNorm { k: 1150, ..good }).contains("multiple of 8"));
    assert!(bad(GemmLayerNorm { tokens: 0, ..good }).contains("tokens must be > 0"));
    assert!(bad(GemmLayerNorm {
        gate_col: 3,
        ..good
    })
    .contains("gate_col = 3 must be even"));
    assert!(bad(GemmLayerNorm {
        ld_mod: 4 * d,
        ..good
    })
    .contains("scale_col 4608 + dim 1152 exceeds"));
    assert!(bad(GemmLayerNorm { eps: 0.0, ..good }).contains("eps"));
    assert!(bad(GemmLayerNorm { x: 0, ..good }).contains("x pointer is null"));
    assert!(bad(GemmLayerNorm {
        bias: P + 4,
        ..good
    })
    .contains("bias pointer"));
    assert!(bad(GemmLayerNorm {
        cache: P + 2,
        ..good
    })
    .contains("cache pointer"));
    assert!(bad(GemmLayerNorm {
        prefetch: [(P, 100), (0, 0)],
        ..good
    })
    .contains("prefetch range 0"));
    // No cache is fine.
    GemmLayerNorm { cache: 0, ..good }.validate(hopper).unwrap();
}

/// Every attention kernel a plan can name (each implementation, head dim, and block size: the
/// small grid of one image + CFG and a large one, on 132 SMs) is embedded.
#[test]
fn every_attention_kernel_is_embedded() {
    use fora::cuda::attention::{attention_plan_on, AttentionImpl, ATTENTION_HEAD_DIMS};
    let mut names = Vec::new();
    for imp in AttentionImpl::ALL {
        for d in ATTENTION_HEAD_DIMS {
            for batch in [2, 256] {
                let p = AttentionParams {
                    qkv: P,
                    out: P + 0x10_0000,
                    batch,
                    tokens: 256,
                    heads: 16,
                    head_dim: d,
                    scale: 1.0 / (d as f32).sqrt(),
                };
                names.push(attention_plan_on(&p, imp, 132).unwrap().kernel);
            }
        }
    }
    names.sort_unstable();
    names.dedup();
    // v1, v2, wgmma (2 sizes), wgmma_mn (2), deep (its own small-grid kernel), split (the
    // same), tma, tma_pp: 10 kernels a head dim.
    assert_eq!(names.len(), 10 * ATTENTION_HEAD_DIMS.len(), "{names:?}");
    assert_embedded("every_attention_kernel_is_embedded", names);
}

#[test]
fn timestep_and_label_plans() {
    let p = TimestepEmbedParams {
        t: P,
        out: P,
        rows: 300,
        half: 128,
        ldo: 256,
    };
    assert_eq!(timestep_embedding_plan(&p).unwrap(), ((300, 1, 1), 128));
    assert!(err(timestep_embedding_plan(&TimestepEmbedParams {
        ldo: 200,
        ..p
    }))
    .contains("ldo"));
    assert!(
        err(timestep_embedding_plan(&TimestepEmbedParams { t: 0, ..p }))
            .contains("t pointer is null")
    );
    assert!(err(timestep_embedding_plan(&TimestepEmbedParams {
        rows: 0,
        ..p
    }))
    .contains("rows"));

    let s = SiluParams {
        input: P,
        out: P,
        rows: 2,
        cols: 1152,
        ld_in: 1152,
        ldo: 1152,
    };
    assert_eq!(silu_plan(&s).unwrap(), (9, 1, 1));
    assert!(err(silu_plan(&SiluParams { ld_in: 1000, ..s })).contains("ld_in"));
    assert!(err(silu_plan(&SiluParams { out: P + 1, ..s })).contains("aligned"));

    let l = LabelSiluParams {
        t_emb: P,
        labels: P,
        table: P,
        out: P,
        rows: 100_000,
        dim: 1152,
        ld_t: 1152,
        ldo: 1152,
        num_labels: 1001,
    };
    // Rows of every step on grid x: more than grid y's 65535 is fine.
    assert_eq!(label_silu_plan(&l).unwrap(), (100_000, 5, 1));
    assert!(err(label_silu_plan(&LabelSiluParams { num_labels: 0, ..l })).contains("num_labels"));
    assert!(err(label_silu_plan(&LabelSiluParams { labels: 0, ..l })).contains("labels pointer"));
}

#[test]
fn patch_embed_plan_checks_shapes() {
    let p = PatchEmbedParams {
        latents: P,
        weight_t: P,
        bias: P,
        pos: P,
        out: P,
        images: 2,
        rows: 4,
        channels: 4,
        height: 32,
        width: 32,
        patch: 2,
        dim: 1152,
    };
    // 8 token rows per block, 128 channels of 1152 (9 blocks in y); their patches (C*p*p =
    // 16 floats each) in shared memory.
    assert_eq!(
        patch_embed_plan(&p).unwrap(),
        ((4 * 256 / 8, 9, 1), 8 * 16 * 4)
    );
    let odd = PatchEmbedParams {
        rows: 3,
        height: 10,
        width: 14,
        ..p
    };
    assert_eq!(patch_embed_plan(&odd).unwrap(), ((14, 9, 1), 8 * 16 * 4));
    assert!(err(patch_embed_plan(&PatchEmbedParams { height: 31, ..p })).contains("divisible"));
    assert!(err(patch_embed_plan(&PatchEmbedParams {
        channels: 17,
        patch: 8,
        height: 32,
        ..p
    }))
    .contains("C*p*p"));
    assert!(err(patch_embed_plan(&PatchEmbedParams { pos: 0, ..p })).contains("pos pointer"));
}

#[test]
fn layernorm_plan_checks_columns_and_alignment() {
    let d = 1152;
    let p = LayerNormModulateParams {
        x: P,
        modulation: P,
        out: P,
        rows: 4,
        tokens: 256,
        dim: d,
        ld_mod: 28 * 6 * d + 2 * d,
        shift_col: 28 * 6 * d,
        scale_col: 28 * 6 * d + d,
        eps: 1e-6,
    };
    // One warp per token row, 4 rows per block: 1024 rows -> 256 blocks.
    assert_eq!(layernorm_modulate_plan(&p).unwrap(), (256, 1, 1));
    assert!(err(layernorm_modulate_plan(&LayerNormModulateParams {
        scale_col: 28 * 6 * d + d + 1,
        ..p
    }))
    .contains("exceed"));
    assert!(err(layernorm_modulate_plan(&LayerNormModulateParams {
        eps: 0.0,
        ..p
    }))
    .contains("eps"));
    // float4 path: x must be 16-byte aligned; the scalar path (odd dim) needs only 4.
    assert!(err(layernorm_modulate_plan(&LayerNormModulateParams {
        x: P + 4,
        ..p
    }))
    .contains("16-byte"));
    let odd = LayerNormModulateParams {
        x: P + 4,
        dim: 100,
        ld_mod: 303,
        shift_col: 3,
        scale_col: 201,
        ..p
    };
    assert!(layernorm_modulate_plan(&odd).is_ok());
}

#[test]
fn fora_reuse_plan_checks_cache_and_gates() {
    let d = 1152;
    let n = 4 * 256 * d as i64;
    let p = ForaReuseParams {
        x: P,
        cache: P,
        modulation: P,
        slab: n,
        rows: 4,
        tokens: 256,
        dim: d,
        layers: 28,
        ld_mod: 28 * 6 * d + 2 * d,
        layer_cols: 6 * d,
        gate_msa_col: 2 * d,
        gate_mlp_col: 5 * d,
    };
    // 8 elements per thread, 256 threads per block.
    assert_eq!(fora_reuse_plan(&p).unwrap(), ((n / 2048) as u32, 1, 1));
    assert!(err(fora_reuse_plan(&ForaReuseParams { slab: n - 1, ..p })).contains("slab"));
    assert!(err(fora_reuse_plan(&ForaReuseParams { layers: 29, ..p })).contains("ld_mod"));
    assert!(
        err(fora_reuse_plan(&ForaReuseParams { cache: 0, ..p })).contains("cache pointer is null")
    );
    assert!(err(fora_reuse_plan(&ForaReuseParams { cache: P + 8, ..p })).contains("16-byte"));
}

#[test]
fn residual_layernorm_plan_checks_columns_and_alignment() {
    let d = 1152;
    let ld_mod = 28 * 6 * d + 2 * d;
    let p = ResidualLayerNormParams {
        acc: P,
        bias: P,
        cache: P,
        x: P,
        modulation: P,
        out: P,
        rows: 4,
        tokens: 256,
        dim: d,
        ld_acc: d,
        ld_mod,
        gate_col: 5 * d,
        shift_col: 6 * d,
        scale_col: 7 * d,
        acc_bf16: 0,
        eps: 1e-6,
        acc_splits: 0,
        acc_split_stride: 0,
        prefetch_a: 0,
        prefetch_b: 0,
        prefetch_a_bytes: 0,
        prefetch_b_bytes: 0,
    };
    // 4 token rows (warps) per block.
    assert_eq!(residual_layernorm_plan(&p).unwrap(), (256, 1, 1));
    assert_eq!(
        residual_layernorm_plan(&ResidualLayerNormParams { cache: 0, ..p }).unwrap(),
        (256, 1, 1)
    );
    let e = |q| err(residual_layernorm_plan(&q));
    // Weight prefetch ranges: none, or whole 16-byte chunks from a 16-byte aligned pointer.
    let prefetch = ResidualLayerNormParams {
        prefetch_a: P,
        prefetch_a_bytes: 4608 * 1152 * 2,
        prefetch_b: P + 16,
        prefetch_b_bytes: 16,
        ..p
    };
    assert_eq!(residual_layernorm_plan(&prefetch).unwrap(), (256, 1, 1));
    assert!(e(ResidualLayerNormParams {
        prefetch_a_bytes: 20,
        ..prefetch
    })
    .contains("multiple of 16"));
    assert!(e(ResidualLayerNormParams {
        prefetch_b: P + 8,
        ..prefetch
    })
    .contains("prefetch_b pointer"));
    assert!(e(ResidualLayerNormParams {
        prefetch_a: 0,
        ..prefetch
    })
    .contains("prefetch_a pointer is null"));
    assert!(e(ResidualLayerNormParams {
        prefetch_b_bytes: 0,
        ..prefetch
    })
    .contains("0 bytes at a null pointer"));
    assert!(e(ResidualLayerNormParams {
        prefetch_a_bytes: -16,
        ..prefetch
    })
    .contains("prefetch_a"));
    assert!(e(ResidualLayerNormParams { dim: 1540, ..p }).contains("dim"));
    assert!(e(ResidualLayerNormParams { dim: 102, ..p }).contains("multiple of 4"));
    assert!(e(ResidualLayerNormParams { ld_acc: d - 4, ..p }).contains("ld_acc"));
    assert!(e(ResidualLayerNormParams {
        gate_col: ld_mod - 4,
        ..p
    })
    .contains("gate_col"));
    assert!(e(ResidualLayerNormParams {
        scale_col: 7 * d + 2,
        ..p
    })
    .contains("scale_col"));
    assert!(e(ResidualLayerNormParams { acc: P + 8, ..p }).contains("16-byte"));
    assert!(e(ResidualLayerNormParams { cache: P + 2, ..p }).contains("cache pointer"));
    assert!(e(ResidualLayerNormParams { eps: f32::NAN, ..p }).contains("eps"));
    assert!(e(ResidualLayerNormParams { rows: 0, ..p }).contains("rows"));
    // bf16 v from the GEMM: 8-byte aligned, no bias, no cache.
    let v16 = ResidualLayerNormParams {
        acc_bf16: 1,
        bias: 0,
        cache: 0,
        acc: P + 8,
        ..p
    };
    assert!(residual_layernorm_plan(&v16).is_ok());
    assert!(e(ResidualLayerNormParams { bias: P, ..v16 }).contains("must be 0"));
    assert!(e(ResidualLayerNormParams { cache: P, ..v16 }).contains("must be 0"));
    assert!(e(ResidualLayerNormParams { acc: P + 4, ..v16 }).contains("8-byte"));
    assert!(e(ResidualLayerNormParams { acc_bf16: 2, ..v16 }).contains("0 or 1"));
    // Split-K slices: disjoint, aligned, f32 only, at most 16.
    let n = 4 * 256 * d as i64;
    let split = ResidualLayerNormParams {
        acc_splits: 4,
        acc_split_stride: n,
        ..p
    };
    assert!(residual_layernorm_plan(&split).is_ok());
    assert!(e(ResidualLayerNormParams {
        acc_split_stride: n - 4,
        ..split
    })
    .contains("acc_split_stride"));
    assert!(e(ResidualLayerNormParams {
        acc_split_stride: n + 2,
        ..split
    })
    .contains("multiple of 4"));
    assert!(e(ResidualLayerNormParams {
        acc_splits: 17,
        ..split
    })
    .contains("acc_splits"));
    assert!(e(ResidualLayerNormParams {
        acc_splits: -1,
        ..split
    })
    .contains("acc_splits"));
    assert!(e(ResidualLayerNormParams {
        acc_splits: 2,
        ..v16
    })
    .contains("f32 product"));
}

#[test]
fn fora_reuse_final_plan_checks_sizes_and_columns() {
    let d = 1152;
    let fin = 28 * 6 * d;
    let p = ForaReuseFinalParams {
        latents: P,
        embed_weight_t: P,
        embed_bias: P,
        pos: P,
        cache: P,
        sum: 0,
        modulation: P,
        out: P,
        x: 0,
        final_w: 0,
        final_b: 0,
        final_out: 0,
        slab: 4 * 256 * d as i64,
        images: 2,
        rows: 4,
        channels: 4,
        height: 32,
        width: 32,
        patch: 2,
        dim: d,
        layers: 28,
        ld_mod: fin + 2 * d,
        layer_cols: 6 * d,
        gate_msa_col: 2 * d,
        gate_mlp_col: 5 * d,
        shift_col: fin,
        scale_col: fin + d,
        n_out: 0,
        eps: 1e-6,
    };
    // DiT-XL: 144 chunks of 8 -> 160 threads (5 warps) per token row, one row per block.
    assert_eq!(
        fora_reuse_final_plan(&p, ReuseTokens::One).unwrap(),
        ((4 * 256, 1, 1), 160)
    );
    // The embedded model (dim 64): 8 threads per token row, 32 rows per block.
    let tiny = ForaReuseFinalParams {
        dim: 64,
        channels: 3,
        layers: 4,
        slab: 4 * 256 * 64,
        ld_mod: 4 * 6 * 64 + 2 * 64,
        layer_cols: 6 * 64,
        gate_msa_col: 2 * 64,
        gate_mlp_col: 5 * 64,
        shift_col: 4 * 6 * 64,
        scale_col: 4 * 6 * 64 + 64,
        ..p
    };
    assert_eq!(
        fora_reuse_final_plan(&tiny, ReuseTokens::One).unwrap(),
        ((1024 / 32, 1, 1), 256)
    );
    // Four tokens a thread: a quarter of the groups; the shared patch buffer holds 32 tokens,
    // so at most 8 groups a block.
    assert_eq!(
        fora_reuse_final_plan(&p, ReuseTokens::Four).unwrap(),
        ((4 * 256 / 4, 1, 1), 160)
    );
    assert_eq!(
        fora_reuse_final_plan(&tiny, ReuseTokens::Four).unwrap(),
        ((1024 / 4 / 8, 1, 1), 64)
    );
    // Tokens per row not a multiple of 4 (7x7 = 49 -> 13 chunks a row).
    let odd = ForaReuseFinalParams {
        height: 14,
        width: 14,
        ..p
    };
    assert_eq!(
        fora_reuse_final_plan(&odd, ReuseTokens::Four).unwrap(),
        ((4 * 13, 1, 1), 160)
    );
    // The pick: 2 rows of 256 tokens keep one a thread, 256 rows take four (132 SMs).
    assert_eq!(
        ReuseTokens::pick(&ForaReuseFinalParams { rows: 2, ..p }, 132),
        ReuseTokens::One
    );
    assert_eq!(
        ReuseTokens::pick(&ForaReuseFinalParams { rows: 256, ..p }, 132),
        ReuseTokens::FourRing
    );
    // DiT-B (dim 768): 96 threads per row, 2 rows per block.
    assert_eq!(fused_reuse_unsupported(768, 16), None);
    assert!(err(fora_reuse_final_plan(
        &ForaReuseFinalParams { dim: 1156, ..p },
        ReuseTokens::One
    ))
    .contains("dim % 8"));
    assert!(err(fora_reuse_final_plan(
        &ForaReuseFinalParams { channels: 17, ..p },
        ReuseTokens::One
    ))
    .contains("C*p*p"));
    assert!(err(fora_reuse_final_plan(
        &ForaReuseFinalParams { slab: 100, ..p },
        ReuseTokens::One
    ))
    .contains("slab"));
    assert!(err(fora_reuse_final_plan(
        &ForaReuseFinalParams { layers: 29, ..p },
        ReuseTokens::One
    ))
    .contains("ld_mod"));
    assert!(err(fora_reuse_final_plan(
        &ForaReuseFinalParams {
            scale_col: fin + 2 * d,
            ..p
        },
        ReuseTokens::One
    ))
    .contains("shift/scale"));
    assert!(err(fora_reuse_final_plan(
        &ForaReuseFinalParams { cache: P + 8, ..p },
        ReuseTokens::One
    ))
    .contains("16-byte"));
    assert!(err(fora_reuse_final_plan(
        &ForaReuseFinalParams { out: 0, ..p },
        ReuseTokens::One
    ))
    .contains("out pointer is null"));
    assert!(err(fora_reuse_final_plan(
        &ForaReuseFinalParams { eps: 0.0, ..p },
        ReuseTokens::One
    ))
    .contains("eps"));
    assert!(err(fora_reuse_final_plan(
        &ForaReuseFinalParams { height: 31, ..p },
        ReuseTokens::One
    ))
    .contains("divisible"));
    // An optional x output must be aligned too.
    assert!(err(fora_reuse_final_plan(
        &ForaReuseFinalParams { x: P + 4, ..p },
        ReuseTokens::One
    ))
    .contains("x pointer"));
    assert!(fora_reuse_final_plan(&ForaReuseFinalParams { x: P, ..p }, ReuseTokens::One).is_ok());

    // fora_sum_final: the sum instead of the cache, the same grid; the cache and gates unread.
    let summed = ForaReuseFinalParams {
        cache: 0,
        sum: P,
        layers: 0,
        ..p
    };
    assert_eq!(
        fora_sum_final_plan(&summed, 1).unwrap(),
        fora_reuse_final_plan(&p, ReuseTokens::One).unwrap()
    );
    assert_eq!(
        fora_sum_final_plan(&summed, 4).unwrap(),
        fora_reuse_final_plan(&p, ReuseTokens::Four).unwrap()
    );
    assert!(err(fora_sum_final_plan(&summed, 2)).contains("1 or 4 tokens"));
    assert!(err(fora_sum_final_plan(
        &ForaReuseFinalParams { sum: 0, ..summed },
        1
    ))
    .contains("sum pointer is null"));
    assert!(err(fora_sum_final_plan(
        &ForaReuseFinalParams {
            sum: P + 4,
            ..summed
        },
        1
    ))
    .contains("16-byte"));
    assert!(err(fora_sum_final_plan(
        &ForaReuseFinalParams { out: 0, ..summed },
        1
    ))
    .contains("out pointer is null"));
}

#[test]
fn fora_cache_sum_plan_checks_count_strides_and_gates() {
    let d = 1152;
    let n = 2 * 256 * d as i64;
    let ld_mod = 28 * 6 * d + 2 * d;
    let p = ForaCacheSumParams {
        cache: P,
        tables: P,
        sums: P,
        slab: n,
        table_stride: 2 * ld_mod as i64,
        sum_stride: n,
        rows: 2,
        tokens: 256,
        dim: d,
        layers: 28,
        ld_mod,
        layer_cols: 6 * d,
        gate_msa_col: 2 * d,
        gate_mlp_col: 5 * d,
        count: 2,
    };
    // 144 chunks of 8 channels = 9 blocks of 16; 2 x 128 token pairs = 16 blocks of 16 pairs.
    assert_eq!(
        fora_cache_sum_plan(&p).unwrap(),
        ("fora_cache_sum_2", (9 * 16, 1, 1))
    );
    // Three or four sums: one token a thread.
    assert_eq!(
        fora_cache_sum_plan(&ForaCacheSumParams { count: 4, ..p }).unwrap(),
        ("fora_cache_sum_4", (9 * 32, 1, 1))
    );
    for count in [0, 5] {
        assert!(err(fora_cache_sum_plan(&ForaCacheSumParams { count, ..p })).contains("count"));
    }
    assert!(err(fora_cache_sum_plan(&ForaCacheSumParams {
        slab: n - 8,
        ..p
    }))
    .contains("slab"));
    assert!(err(fora_cache_sum_plan(&ForaCacheSumParams {
        sum_stride: n - 4,
        ..p
    }))
    .contains("sum_stride"));
    assert!(err(fora_cache_sum_plan(&ForaCacheSumParams {
        table_stride: ld_mod as i64,
        ..p
    }))
    .contains("table_stride"));
    assert!(err(fora_cache_sum_plan(&ForaCacheSumParams { layers: 29, ..p })).contains("ld_mod"));
    assert!(err(fora_cache_sum_plan(&ForaCacheSumParams { dim: 1100, ..p })).contains("dim"));
    assert!(
        err(fora_cache_sum_plan(&ForaCacheSumParams { sums: 0, ..p }))
            .contains("sums pointer is null")
    );
    assert!(err(fora_cache_sum_plan(&ForaCacheSumParams {
        tables: P + 4,
        ..p
    }))
    .contains("16-byte"));
}

#[test]
fn sampler_plans_check_rows_channels_and_coefficients() {
    let diffusion = Diffusion::new("250", true).unwrap();
    let mut p = SamplerStepParams {
        model_out: P,
        x: P,
        noise: 0,
        seed: 1,
        noise_stream: 1,
        images: 2,
        rows: 4,
        channels: 4,
        out_channels: 8,
        height: 32,
        width: 32,
        patch: 2,
        guided_channels: 3,
        cfg_scale: 4.0,
        learn_sigma: 1,
        ..Default::default()
    };
    set_update(
        &mut p,
        &diffusion.step_update(249, SamplerKind::Ddpm).unwrap(),
    );
    assert_eq!(p.kind, FORA_SAMPLER_DDPM as i32);
    assert_eq!(p.add_noise, 1);
    // 8192 latents, 4 per thread, 64 threads per block.
    assert_eq!(sampler_step_plan(&p).unwrap(), (32, 1, 1));
    assert!(err(sampler_step_plan(&SamplerStepParams { rows: 3, ..p })).contains("rows"));
    assert!(err(sampler_step_plan(&SamplerStepParams {
        out_channels: 4,
        ..p
    }))
    .contains("out_channels"));
    assert!(err(sampler_step_plan(&SamplerStepParams { rows: 2, ..p })).contains("CFG rows"));
    assert!(err(sampler_step_plan(&SamplerStepParams { kind: 7, ..p })).contains("kind"));
    assert!(err(sampler_step_plan(&SamplerStepParams {
        post_coef1: f32::NAN,
        ..p
    }))
    .contains("not finite"));
    assert!(
        err(sampler_step_plan(&SamplerStepParams { noise: P + 2, ..p })).contains("noise pointer")
    );
    let ddim = Diffusion::new("ddim50", true).unwrap();
    set_update(
        &mut p,
        &ddim.step_update(0, SamplerKind::Ddim { eta: 0.0 }).unwrap(),
    );
    assert_eq!((p.kind, p.add_noise), (FORA_SAMPLER_DDIM as i32, 0));
    assert!(sampler_step_plan(&p).is_ok());

    // final_sampler_step: the update's checks and the final Linear's; a tile of 8 tokens of
    // one image a block (256 tokens, 2 images).
    let f = SamplerStepParams {
        model_out: 0,
        xn: P,
        final_w: P,
        final_b: P,
        dim: 1152,
        ..p
    };
    assert_eq!(final_sampler_step_plan(&f).unwrap(), (32, 2, 1));
    assert_eq!(update_kernel(&f), "final_sampler_step");
    assert_eq!(update_kernel(&p), "sampler_step");
    assert!(update_plan(&f).is_ok());
    assert!(err(final_sampler_step_plan(&SamplerStepParams { rows: 3, ..f })).contains("rows"));
    assert!(err(final_sampler_step_plan(&SamplerStepParams {
        dim: 1144,
        ..f
    }))
    .contains("dim 1144"));
    assert!(err(final_sampler_step_plan(&SamplerStepParams { dim: 0, ..f })).contains("dim"));
    // p = 4 with learned sigma: 128 outputs a token, more than the kernel's 64.
    assert!(err(final_sampler_step_plan(&SamplerStepParams {
        patch: 4,
        ..f
    }))
    .contains("= 128"));
    assert!(err(final_sampler_step_plan(&SamplerStepParams {
        xn: P + 8,
        ..f
    }))
    .contains("xn pointer"));
    assert!(err(final_sampler_step_plan(&SamplerStepParams {
        final_b: 0,
        ..f
    }))
    .contains("final_b"));
    assert!(err(final_sampler_step_plan(&SamplerStepParams {
        images: 70000,
        rows: 70000,
        guided_channels: 0,
        ..f
    }))
    .contains("65535"));
    assert!(!final_sampler_supported(1152, 50) && !final_sampler_supported(1168, 32));
    assert!(final_sampler_supported(1152, 32) && final_sampler_supported(384, 64));

    let u = UnpatchifyParams {
        model_out: P,
        out: P,
        rows: 5,
        out_channels: 8,
        height: 32,
        width: 32,
        patch: 2,
        guided_channels: 0,
        cfg_scale: 1.0,
    };
    assert!(unpatchify_plan(&u).is_ok());
    assert!(err(unpatchify_plan(&UnpatchifyParams {
        guided_channels: 3,
        ..u
    }))
    .contains("even"));
    assert!(err(unpatchify_plan(&UnpatchifyParams {
        guided_channels: 9,
        rows: 4,
        ..u
    }))
    .contains("guided_channels"));

    let f = NormalFillParams {
        out: P,
        seed: 1,
        stream: 0,
        n: 1001,
    };
    assert_eq!(normal_fill_plan(&f).unwrap(), (1, 1, 1));
    assert!(err(normal_fill_plan(&NormalFillParams { n: 0, ..f })).contains("n must be"));
}

#[test]
fn gpu_new_without_a_device_is_a_clear_error() {
    if fora::cuda::device::device_count().unwrap_or(0) > 0 {
        println!("SKIP gpu_new_without_a_device_is_a_clear_error: a CUDA device exists");
        return;
    }
    // Must be an error naming the problem, never a panic (cudarc panics without libcuda).
    let e = format!(
        "{:#}",
        fora::cuda::Gpu::new(0).expect_err("no device, yet Gpu::new succeeded")
    );
    assert!(
        e.contains("no CUDA driver")
            || e.contains("no CUDA device")
            || e.contains("without CUDA kernels"),
        "unclear error: {e}"
    );
    println!("Gpu::new without a device: {e}");
}

#[test]
fn a_run_past_one_gemm_launchs_rows_is_refused_before_it_allocates() {
    use fora::cuda::gemm::GEMM_MAX_M;
    use fora::cuda::model::check_model_rows;
    // DiT-XL/2 at 256 px: 256 tokens a row, so 8191 rows fit (2,096,896 token rows) and 8192
    // do not; at 512 px (1024 tokens) 2047 and 2048.
    for (latent, tokens) in [(32, 256), (64, 1024)] {
        let cfg = fora::config::DitConfig::official("DiT-XL/2", latent).unwrap();
        assert_eq!(cfg.tokens(), tokens);
        let most = GEMM_MAX_M / tokens;
        check_model_rows(&cfg, most).unwrap();
        let e = err(check_model_rows(&cfg, most + 1));
        assert!(
            e.contains(&format!("at most {most} model rows")) && e.contains("DiT-XL/2"),
            "{e}"
        );
        // No wrap: a product past usize saturates and is refused.
        assert!(check_model_rows(&cfg, usize::MAX).is_err());
    }
}

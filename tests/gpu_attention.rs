//! Flash attention (kernels/attention.cu) against the CPU reference's attention
//! (`fora::cpu::ops::attention`, the oracle of the whole forward) on the same bf16-rounded q, k, v,
//! read from the fused qkv layout [B, T, 3, H, d] the qkv Linear writes. An independent plain-loop
//! twin cross-checks that oracle on every GPU case and, without a device, on small shapes.
//!
//! Every implementation (v1, the default; the opt-in v2; the opt-in Hopper-only wgmma;
//! `AttentionImpl`) runs on every GPU shape with the same checks. The wgmma cases print
//! `SKIP <name>: ...` on a device that is not a compute capability 9.x.
//!
//! Without a CUDA device the GPU tests print `SKIP <name>: no CUDA device` and pass; with
//! `FORA_REQUIRE_GPU=1` they fail instead. The parameter-validation tests need no device.

mod attention_cases;

use anyhow::{ensure, Result};
use attention_cases::{attention_reference, check_oracle, params, run_case, run_case_sized, Shape};
use fora::cuda::attention::{
    attention, attention_plan, attention_plan_for, attention_plan_on, attention_with,
    AttentionImpl, ATTENTION_BLOCK_M, ATTENTION_V2_BLOCK_M, ATTENTION_WGMMA_BLOCK_M,
};
use fora::cuda::dptr;
use fora::cuda::params::AttentionParams;
use fora::cuda::testing::{poison_bf16, round_bf16, test_gpu, to_bf16, TestRng};
use half::bf16;

/// The v1 kernels (the default off Hopper) on one shape.
fn gpu_case(test: &str, s: Shape, qk_std: f32, seed: u64) {
    gpu_case_impl(test, s, qk_std, seed, AttentionImpl::V1);
}

/// The v2 kernels on one shape.
fn gpu_case_v2(test: &str, s: Shape, qk_std: f32, seed: u64) {
    gpu_case_impl(test, s, qk_std, seed, AttentionImpl::V2);
}

fn gpu_case_impl(test: &str, s: Shape, qk_std: f32, seed: u64, imp: AttentionImpl) {
    let Some(gpu) = test_gpu(test) else { return };
    let name = format!(
        "attention {} B={} H={} T={} d={} (q,k std {qk_std})",
        imp.name(),
        s.batch,
        s.heads,
        s.tokens,
        s.head_dim
    );
    if let Err(e) = run_case(&gpu, &name, s, qk_std, seed, imp) {
        panic!("{test}: {e:#}");
    }
}

/// The qkv Linear and attention in one launch: Hopper only (wgmma, TMA, clusters of four).
#[test]
fn gpu_qkv_attention() -> Result<()> {
    let Some(gpu) = test_gpu("gpu_qkv_attention") else {
        return Ok(());
    };
    if gpu.compute_capability().0 != 9 {
        println!("SKIP gpu_qkv_attention: not a Hopper (sm_90a only)");
        return Ok(());
    }
    attention_cases::check_qkv_attention(&gpu)
}

fn shape(batch: usize, heads: usize, tokens: usize, head_dim: usize) -> Shape {
    Shape {
        batch,
        heads,
        tokens,
        head_dim,
    }
}

#[test]
fn gpu_attention_xl2_256px() {
    gpu_case("gpu_attention_xl2_256px", shape(2, 16, 256, 72), 1.0, 1);
}

#[test]
fn gpu_attention_xl2_512px() {
    gpu_case("gpu_attention_xl2_512px", shape(4, 16, 1024, 72), 1.0, 2);
}

#[test]
fn gpu_attention_s2_256px() {
    gpu_case("gpu_attention_s2_256px", shape(2, 6, 256, 64), 1.0, 3);
}

#[test]
fn gpu_attention_d128_t77() {
    gpu_case("gpu_attention_d128_t77", shape(3, 2, 77, 128), 1.0, 4);
}

#[test]
fn gpu_attention_single_token() {
    gpu_case("gpu_attention_single_token", shape(1, 1, 1, 72), 1.0, 5);
}

#[test]
fn gpu_attention_d64_t130() {
    gpu_case("gpu_attention_d64_t130", shape(2, 3, 130, 64), 1.0, 6);
}

/// One valid key in the last tile (65 = 64 + 1) and a query tile with one valid row.
#[test]
fn gpu_attention_d72_t65() {
    gpu_case("gpu_attention_d72_t65", shape(2, 4, 65, 72), 1.0, 7);
}

/// Peaked softmax (logits with standard deviation ~9): the online max must rescale correctly
/// when a later key tile holds a much larger score than the earlier ones.
#[test]
fn gpu_attention_peaked_softmax() {
    gpu_case("gpu_attention_peaked_softmax", shape(2, 4, 300, 72), 3.0, 8);
    gpu_case(
        "gpu_attention_peaked_softmax",
        shape(1, 2, 200, 128),
        3.0,
        9,
    );
}

// ---- v2: every v1 shape again, plus its own block edges (128 query rows per block) ---------

#[test]
fn gpu_attention_v2_xl2_256px() {
    gpu_case_v2("gpu_attention_v2_xl2_256px", shape(2, 16, 256, 72), 1.0, 1);
}

#[test]
fn gpu_attention_v2_xl2_512px() {
    gpu_case_v2("gpu_attention_v2_xl2_512px", shape(4, 16, 1024, 72), 1.0, 2);
}

#[test]
fn gpu_attention_v2_s2_256px() {
    gpu_case_v2("gpu_attention_v2_s2_256px", shape(2, 6, 256, 64), 1.0, 3);
}

#[test]
fn gpu_attention_v2_d128_t77() {
    gpu_case_v2("gpu_attention_v2_d128_t77", shape(3, 2, 77, 128), 1.0, 4);
}

#[test]
fn gpu_attention_v2_single_token() {
    gpu_case_v2("gpu_attention_v2_single_token", shape(1, 1, 1, 72), 1.0, 5);
}

#[test]
fn gpu_attention_v2_d64_t130() {
    gpu_case_v2("gpu_attention_v2_d64_t130", shape(2, 3, 130, 64), 1.0, 6);
}

#[test]
fn gpu_attention_v2_d72_t65() {
    gpu_case_v2("gpu_attention_v2_d72_t65", shape(2, 4, 65, 72), 1.0, 7);
}

#[test]
fn gpu_attention_v2_peaked_softmax() {
    gpu_case_v2(
        "gpu_attention_v2_peaked_softmax",
        shape(2, 4, 300, 72),
        3.0,
        8,
    );
    gpu_case_v2(
        "gpu_attention_v2_peaked_softmax",
        shape(1, 2, 200, 128),
        3.0,
        9,
    );
}

/// T = 129: the second query block holds one valid row, the last key tile one valid key; and
/// T = 128 exactly one query block.
#[test]
fn gpu_attention_v2_block_edges() {
    gpu_case_v2(
        "gpu_attention_v2_block_edges",
        shape(3, 2, 129, 72),
        1.0,
        11,
    );
    gpu_case_v2(
        "gpu_attention_v2_block_edges",
        shape(2, 3, 128, 64),
        1.0,
        12,
    );
    gpu_case_v2(
        "gpu_attention_v2_block_edges",
        shape(1, 2, 191, 128),
        1.0,
        13,
    );
}

/// Many blocks in flight at the benchmark's DiT-XL/2 shape (two blocks per SM, several waves).
#[test]
fn gpu_attention_v2_many_blocks() {
    gpu_case_v2(
        "gpu_attention_v2_many_blocks",
        shape(48, 16, 256, 72),
        1.0,
        14,
    );
}

// ---- wgmma (Hopper only): the same shapes, plus its own block edges (128 query rows) -------

/// Every shape of the v1 and v2 suites on the wgmma kernels (transposing V), on a Hopper GPU;
/// SKIP elsewhere.
#[test]
fn gpu_attention_wgmma_shapes() {
    wgmma_shapes("gpu_attention_wgmma_shapes", AttentionImpl::Wgmma);
}

/// The same on the wgmma kernels that read V MN-major (`gpu_wgmma_probe`'s MN-major cases
/// check that layout alone).
#[test]
fn gpu_attention_wgmma_mn_shapes() {
    wgmma_shapes("gpu_attention_wgmma_mn_shapes", AttentionImpl::WgmmaMn);
}

/// The same on wgmma_mn_deep: its four-stage 64-row blocks where the grid is small (as picked),
/// wgmma_mn's 128-row blocks otherwise.
#[test]
fn gpu_attention_wgmma_mn_deep_shapes() {
    wgmma_shapes(
        "gpu_attention_wgmma_mn_deep_shapes",
        AttentionImpl::WgmmaMnDeep,
    );
}

/// The same on wgmma_mn_split: its split-key 64-row blocks where the grid is small (as
/// picked), wgmma_mn's 128-row blocks otherwise.
#[test]
fn gpu_attention_wgmma_mn_split_shapes() {
    wgmma_shapes(
        "gpu_attention_wgmma_mn_split_shapes",
        AttentionImpl::WgmmaMnSplit,
    );
}

/// The same on the persistent TMA kernels, with one CTA an SM, one CTA, and 7 (every CTA walks
/// several units: the Q slot and the K/V ring wrap).
#[test]
fn gpu_attention_tma_shapes() {
    wgmma_shapes("gpu_attention_tma_shapes", AttentionImpl::Tma);
}

/// The same with the consumer warpgroups taking turns (tma_pp).
#[test]
fn gpu_attention_tma_pp_shapes() {
    wgmma_shapes("gpu_attention_tma_pp_shapes", AttentionImpl::TmaPingPong);
}

/// tma_pp gives tma's bits (the turns change when the wgmmas are issued, not what they
/// compute), at DiT-XL/2's shapes (one image + CFG, and 48 rows: every CTA walks several
/// units) and an odd one, on one CTA an SM and on 7 CTAs.
#[test]
fn gpu_attention_tma_pp_gives_tma_bits() {
    let test = "gpu_attention_tma_pp_gives_tma_bits";
    let Some(gpu) = test_gpu(test) else { return };
    if gpu.compute_capability().0 != 9 {
        println!("SKIP {test}: the TMA kernels need a Hopper");
        return;
    }
    for (i, s) in [
        shape(2, 16, 256, 72),
        shape(48, 16, 256, 72),
        shape(3, 2, 129, 128),
    ]
    .into_iter()
    .enumerate()
    {
        for sms in [gpu.sm_count(), 7] {
            let name = format!("{test} {s:?} on {sms}");
            let imps = (AttentionImpl::TmaPingPong, AttentionImpl::Tma);
            attention_cases::check_same_bits(&gpu, &name, s, 520 + i as u64, imps, sms).unwrap();
        }
    }
}

fn wgmma_shapes(test: &str, imp: AttentionImpl) {
    let Some(gpu) = test_gpu(test) else { return };
    let (major, minor) = gpu.compute_capability();
    if major != 9 {
        println!("SKIP {test}: the wgmma kernels need compute capability 9.x, this device is {major}.{minor}");
        return;
    }
    for (i, (s, qk_std)) in [
        (shape(2, 16, 256, 72), 1.0),  // DiT-XL/2 256 px, one image + CFG
        (shape(4, 16, 1024, 72), 1.0), // DiT-XL/2 512 px
        (shape(2, 6, 256, 64), 1.0),
        (shape(3, 2, 77, 128), 1.0),
        (shape(1, 1, 1, 72), 1.0),
        (shape(2, 3, 130, 64), 1.0),
        (shape(2, 4, 65, 72), 1.0),
        (shape(2, 4, 300, 72), 3.0), // peaked softmax
        (shape(3, 2, 129, 72), 1.0), // one valid row in the second block, one key in the last tile
        (shape(2, 3, 128, 64), 1.0), // exactly one block
        (shape(1, 2, 191, 128), 1.0),
        (shape(48, 16, 256, 72), 1.0), // many blocks in flight, several waves
    ]
    .into_iter()
    .enumerate()
    {
        // Block sizes as this device picks them, then 128-row blocks whatever the grid (the TMA
        // kernel: its persistent grid, then 1 and 7 CTAs).
        let sizes: &[(usize, &str)] = if imp.is_tma() {
            &[
                (gpu.sm_count(), "one CTA an SM"),
                (1, "one CTA"),
                (7, "7 CTAs"),
            ]
        } else {
            &[(gpu.sm_count(), "as picked"), (1, "128-row")]
        };
        for &(sms, rows) in sizes {
            let name = format!(
                "attention {} ({rows}) B={} H={} T={} d={} (q,k std {qk_std})",
                imp.name(),
                s.batch,
                s.heads,
                s.tokens,
                s.head_dim
            );
            let seed = 40 + i as u64;
            if let Err(e) = run_case_sized(&gpu, &name, s, qk_std, seed, imp, sms) {
                panic!("{test}: {e:#}");
            }
        }
    }
}

/// The wgmma probes (kernels/probe_sm90.cu): each operand form and width alone, every case
/// reported, so that a failing wgmma attention test can be traced to the assumption that broke
/// (registers-A fragment layout, K-major B with 9 atoms, MN-major B with two n panels). SKIP
/// off Hopper.
#[test]
fn gpu_wgmma_probe() {
    use fora::cuda::probe::WgmmaProbeMode;
    let test = "gpu_wgmma_probe";
    let Some(gpu) = test_gpu(test) else { return };
    let (major, minor) = gpu.compute_capability();
    if major != 9 {
        println!("SKIP {test}: wgmma needs compute capability 9.x, this device is {major}.{minor}");
        return;
    }
    let mut failed = Vec::new();
    for (i, mode) in WgmmaProbeMode::ALL.into_iter().enumerate() {
        for &n in mode.widths() {
            match attention_cases::run_wgmma_probe(&gpu, mode, n as usize, 60 + i as u64) {
                Ok(()) => println!("{test}: {mode:?} n={n}: ok"),
                Err(e) => {
                    println!("{test}: {mode:?} n={n}: FAILED: {e:#}");
                    failed.push(format!("{mode:?} n={n}"));
                }
            }
        }
    }
    assert!(failed.is_empty(), "{test}: failed: {failed:?}");
}

/// The TMA probe: the 128-byte-swizzled box layout, the zero fill past the edges and the
/// mbarrier's two phases that the TMA GEMM (`FORA_GEMM=tma`) rests on. SKIP off Hopper.
#[test]
fn gpu_tma_probe() {
    let test = "gpu_tma_probe";
    let Some(gpu) = test_gpu(test) else { return };
    let (major, minor) = gpu.compute_capability();
    if major != 9 {
        println!("SKIP {test}: TMA needs compute capability 9.x, this device is {major}.{minor}");
        return;
    }
    attention_cases::run_tma_probe(&gpu, 61).expect("TMA probe");
    println!("{test}: ok");
}

/// The cluster probe: TMA multicast into both CTAs of a cluster of two, each CTA's barrier
/// counting both boxes, and the CTAs' arrivals on each other's barriers (`mapa`), which the
/// multicast TMA GEMM (`FORA_GEMM=tma_mc`) rests on. SKIP off Hopper.
#[test]
fn gpu_tma_cluster_probe() {
    let test = "gpu_tma_cluster_probe";
    let Some(gpu) = test_gpu(test) else { return };
    let (major, minor) = gpu.compute_capability();
    if major != 9 {
        println!("SKIP {test}: TMA multicast needs compute capability 9.x, this device is {major}.{minor}");
        return;
    }
    attention_cases::run_tma_cluster_probe(&gpu, 62).expect("TMA cluster probe");
    println!("{test}: ok");
}

/// Off Hopper the wgmma implementation is refused with an error that names the requirement.
#[test]
fn gpu_attention_wgmma_refused_off_hopper() {
    let test = "gpu_attention_wgmma_refused_off_hopper";
    let Some(gpu) = test_gpu(test) else { return };
    let (major, minor) = gpu.compute_capability();
    if major == 9 {
        println!("SKIP {test}: this device is a Hopper ({major}.{minor}), where wgmma runs");
        return;
    }
    let p = params(shape(1, 1, 64, 72), 0x1000, 0x2000);
    for imp in [
        AttentionImpl::Wgmma,
        AttentionImpl::WgmmaMn,
        AttentionImpl::WgmmaMnDeep,
        AttentionImpl::WgmmaMnSplit,
        AttentionImpl::Tma,
        AttentionImpl::TmaPingPong,
    ] {
        let msg = format!(
            "{:#}",
            unsafe { attention_with(&gpu, &p, imp) }.expect_err("wgmma off Hopper")
        );
        assert!(
            msg.contains("compute capability 9.x") && msg.contains(&format!("{major}.{minor}")),
            "unclear error: {msg}"
        );
    }
}

/// `attention` launches exactly what `AttentionImpl::Auto` resolves to on this device.
#[test]
fn gpu_attention_dispatch_follows_selection() {
    let Some(gpu) = test_gpu("gpu_attention_dispatch_follows_selection") else {
        return;
    };
    let run = || -> Result<()> {
        let imp = AttentionImpl::Auto.resolve(gpu.compute_capability().0);
        let s = shape(2, 3, 100, 72);
        let mut rng = TestRng::new(15);
        let qkv = to_bf16(&rng.normal_vec(s.batch * s.tokens * 3 * s.heads * s.head_dim, 1.0));
        let qkv_dev = gpu.upload(&qkv, "attention dispatch qkv")?;
        let out_len = s.batch * s.tokens * s.heads * s.head_dim;
        let mut out_dev = gpu.alloc_zeros::<bf16>(out_len, "attention dispatch out")?;
        let p = params(s, dptr(&qkv_dev), dptr(&out_dev));
        poison_bf16(&gpu, &mut out_dev)?;
        unsafe { attention(&gpu, &p) }?;
        let via_default = gpu.download(&out_dev)?;
        poison_bf16(&gpu, &mut out_dev)?;
        unsafe { attention_with(&gpu, &p, imp) }?;
        let explicit = gpu.download(&out_dev)?;
        ensure!(
            via_default.iter().all(|v| !v.is_nan()),
            "attention ({}) left NaN in the output",
            imp.name()
        );
        ensure!(
            via_default
                .iter()
                .zip(&explicit)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "attention() and attention_with({}) gave different bits",
            imp.name()
        );
        Ok(())
    };
    if let Err(e) = run() {
        panic!("gpu_attention_dispatch_follows_selection: {e:#}");
    }
}

/// d = 80 is not an instantiated head_dim: a clear error on the device path too.
#[test]
fn gpu_attention_rejects_head_dim_80() {
    let Some(gpu) = test_gpu("gpu_attention_rejects_head_dim_80") else {
        return;
    };
    let s = shape(1, 2, 16, 80);
    let qkv = gpu
        .alloc_zeros::<bf16>(s.batch * s.tokens * 3 * s.heads * s.head_dim, "qkv")
        .expect("alloc qkv");
    let out = gpu
        .alloc_zeros::<bf16>(s.batch * s.tokens * s.heads * s.head_dim, "out")
        .expect("alloc out");
    let err = unsafe { attention(&gpu, &params(s, dptr(&qkv), dptr(&out))) }
        .expect_err("head_dim 80 must be rejected");
    let msg = format!("{err:#}");
    assert!(msg.contains("head_dim 80"), "unclear error: {msg}");
}

// ---- parameter validation (no device needed) ----------------------------------------------

fn valid() -> AttentionParams {
    params(shape(2, 16, 256, 72), 0x1000, 0x2000)
}

#[test]
fn attention_plan_rejects_head_dim_80() {
    let mut p = valid();
    p.head_dim = 80;
    p.scale = 1.0 / 80f32.sqrt();
    let msg = format!("{:#}", attention_plan(&p).expect_err("d = 80 must fail"));
    assert!(
        msg.contains("head_dim 80") && msg.contains("72"),
        "unclear error: {msg}"
    );
}

#[test]
fn attention_plan_grid_and_kernels() {
    let plan = attention_plan(&valid()).expect("valid params");
    assert_eq!(plan.kernel, "attention_d72");
    assert_eq!(plan.grid, (256 / ATTENTION_BLOCK_M, 16, 2));
    // Q + 2 K + 2 V tiles of 64 rows x (80 + 8) bf16.
    assert_eq!(plan.shared_mem_bytes, 5 * 64 * 88 * 2);

    let mut p = valid();
    p.head_dim = 64;
    p.tokens = 77;
    let plan = attention_plan(&p).expect("valid params");
    assert_eq!(plan.kernel, "attention_d64");
    assert_eq!(plan.grid.0, 2);
    assert_eq!(plan.shared_mem_bytes, 5 * 64 * 72 * 2);

    p.head_dim = 128;
    p.tokens = 1;
    let plan = attention_plan(&p).expect("valid params");
    assert_eq!(plan.kernel, "attention_d128");
    assert_eq!(plan.grid.0, 1);
    assert_eq!(plan.shared_mem_bytes, 5 * 64 * 136 * 2);
}

#[test]
fn attention_v2_plan_grid_and_kernels() {
    let v2 = AttentionImpl::V2;
    let plan = attention_plan_for(&valid(), v2).expect("valid params");
    assert_eq!(plan.kernel, "attention_v2_d72");
    assert_eq!(ATTENTION_V2_BLOCK_M, 128);
    assert_eq!(plan.grid, (2, 16, 2));
    assert_eq!(plan.block, (128, 1, 1));
    // Q tile of 128 rows + 2 K + 2 V tiles of 64 rows, x (80 + 8) bf16.
    assert_eq!(plan.shared_mem_bytes, (128 + 4 * 64) * 88 * 2);

    let mut p = valid();
    p.head_dim = 64;
    p.tokens = 129;
    let plan = attention_plan_for(&p, v2).expect("valid params");
    assert_eq!(plan.kernel, "attention_v2_d64");
    assert_eq!(plan.grid.0, 2);
    assert_eq!(plan.shared_mem_bytes, (128 + 4 * 64) * 72 * 2);

    p.head_dim = 128;
    p.tokens = 128;
    let plan = attention_plan_for(&p, v2).expect("valid params");
    assert_eq!(plan.kernel, "attention_v2_d128");
    assert_eq!(plan.grid.0, 1);
    assert_eq!(plan.shared_mem_bytes, (128 + 4 * 64) * 136 * 2);
    // Two blocks per SM must fit in an H100's 227 KiB of shared memory.
    assert!(2 * plan.shared_mem_bytes <= 227 * 1024);

    // The default plan is v1's.
    assert_eq!(
        attention_plan(&valid()).expect("valid"),
        attention_plan_for(&valid(), AttentionImpl::V1).expect("valid")
    );
}

#[test]
fn attention_wgmma_plan_grid_and_kernels() {
    let w = AttentionImpl::Wgmma;
    let plan = attention_plan_for(&valid(), w).expect("valid params");
    assert_eq!(plan.kernel, "attention_wgmma_d72");
    assert_eq!(ATTENTION_WGMMA_BLOCK_M, 128);
    assert_eq!(plan.grid, (2, 16, 2));
    assert_eq!(plan.block, (256, 1, 1));
    // Two stages of (K: 2 swizzle panels x 64 rows x 128 B, V: 64 x 72 bf16), V^T 72 x 128 B,
    // 1 KiB of alignment.
    assert_eq!(
        plan.shared_mem_bytes,
        2 * (2 * 64 * 128 + 64 * 72 * 2) + 72 * 128 + 1024
    );
    // Two blocks per SM must fit in an H100's 227 KiB of shared memory.
    assert!(2 * plan.shared_mem_bytes <= 227 * 1024);

    let mut p = valid();
    p.head_dim = 64;
    p.tokens = 129;
    let plan = attention_plan_for(&p, w).expect("valid params");
    assert_eq!(plan.kernel, "attention_wgmma_d64");
    assert_eq!(plan.grid.0, 2);
    assert_eq!(
        plan.shared_mem_bytes,
        2 * (64 * 128 + 64 * 64 * 2) + 64 * 128 + 1024
    );

    p.head_dim = 128;
    p.tokens = 128;
    let plan = attention_plan_for(&p, w).expect("valid params");
    assert_eq!(plan.kernel, "attention_wgmma_d128");
    assert_eq!(plan.grid.0, 1);
    assert_eq!(
        plan.shared_mem_bytes,
        2 * (2 * 64 * 128 + 64 * 128 * 2) + 128 * 128 + 1024
    );

    // On a device: one image + CFG (2 x 16 x 2 = 64 blocks of 128 rows) on 132 SMs takes the
    // 64-row blocks; batch 256 (8192 blocks) the 128-row ones; other families are unchanged.
    let small = params(shape(2, 16, 256, 72), 0x1000, 0x2000);
    let plan = attention_plan_on(&small, w, 132).expect("valid params");
    assert_eq!(plan.kernel, "attention_wgmma_m64_d72");
    assert_eq!(plan.grid, (4, 16, 2));
    assert_eq!(plan.block, (128, 1, 1));
    assert_eq!(
        plan.shared_mem_bytes,
        attention_plan_for(&small, w).unwrap().shared_mem_bytes
    );
    assert_eq!(
        attention_plan_on(&small, w, 64).unwrap(),
        attention_plan_for(&small, w).unwrap()
    );
    let large = params(shape(256, 16, 256, 72), 0x1000, 0x2000);
    assert_eq!(
        attention_plan_on(&large, w, 132).unwrap(),
        attention_plan_for(&large, w).unwrap()
    );
    for imp in [AttentionImpl::V1, AttentionImpl::V2] {
        assert_eq!(
            attention_plan_on(&small, imp, 132).unwrap(),
            attention_plan_for(&small, imp).unwrap()
        );
    }

    // V MN-major: V stages in K's layout (2 panels of 64 x 128 B for d 72), no V^T.
    let mn = AttentionImpl::WgmmaMn;
    let plan = attention_plan_for(&valid(), mn).expect("valid params");
    assert_eq!(plan.kernel, "attention_wgmma_mn_d72");
    assert_eq!(plan.grid, (2, 16, 2));
    assert_eq!(plan.block, (256, 1, 1));
    assert_eq!(plan.shared_mem_bytes, 2 * (2 * 2 * 64 * 128) + 1024);
    let plan = attention_plan_on(&small, mn, 132).expect("valid params");
    assert_eq!(plan.kernel, "attention_wgmma_mn_m64_d72");
    assert_eq!(plan.block, (128, 1, 1));
    p.head_dim = 64;
    assert_eq!(
        attention_plan_for(&p, mn).unwrap().shared_mem_bytes,
        2 * (2 * 64 * 128) + 1024
    );

    // The small-grid variants of wgmma_mn: their own 64-row blocks in small grids (deep: four
    // stages; split: 256 threads on 64 rows, six stages), wgmma_mn's 128-row blocks elsewhere.
    for (imp, kernel, threads, stages) in [
        (
            AttentionImpl::WgmmaMnDeep,
            "attention_wgmma_mn_deep_m64_d72",
            128,
            4,
        ),
        (
            AttentionImpl::WgmmaMnSplit,
            "attention_wgmma_mn_split_m64_d72",
            256,
            6,
        ),
    ] {
        let plan = attention_plan_on(&small, imp, 132).expect("valid params");
        assert_eq!(plan.kernel, kernel);
        assert_eq!(plan.block, (threads, 1, 1));
        assert_eq!(plan.grid, (4, 16, 2));
        assert_eq!(plan.shared_mem_bytes, stages * (2 * 2 * 64 * 128) + 1024);
        assert_eq!(
            attention_plan_on(&large, imp, 132).unwrap(),
            attention_plan_on(&large, mn, 132).unwrap()
        );
        assert_eq!(
            attention_plan_for(&valid(), imp).unwrap(),
            attention_plan_for(&valid(), mn).unwrap()
        );
    }

    // TMA: a persistent grid of at most one CTA an SM over (batch, head, 128-query) units;
    // shared memory = 5 tiles of 128 rows x 2 panels x 128 B (d 72) + staging of 8 warps x 16
    // rows x (80 + 8) bf16 + 6 barriers + 1 KiB.
    let tma = AttentionImpl::Tma;
    let plan = attention_plan_for(&valid(), tma).expect("valid params");
    assert_eq!(plan.kernel, "attention_tma_d72");
    assert_eq!(plan.grid, (64, 1, 1), "one CTA a unit without an SM count");
    assert_eq!(plan.block, (384, 1, 1));
    assert_eq!(
        plan.shared_mem_bytes,
        5 * 2 * 128 * 128 + 8 * 16 * 88 * 2 + 48 + 1024
    );
    assert_eq!(
        attention_plan_on(&large, tma, 132).unwrap().grid,
        (132, 1, 1)
    );
    assert_eq!(attention_plan_on(&small, tma, 132).unwrap().grid.0, 64);
    // Its ping-pong twin: the same launch, its own kernel.
    let pp = attention_plan_for(&valid(), AttentionImpl::TmaPingPong).expect("valid params");
    assert_eq!(pp.kernel, "attention_tma_pp_d72");
    assert_eq!(
        (pp.grid, pp.block, pp.shared_mem_bytes),
        (plan.grid, plan.block, plan.shared_mem_bytes)
    );
    p.head_dim = 128;
    let plan = attention_plan_for(&p, tma).unwrap();
    assert_eq!(plan.kernel, "attention_tma_d128");
    assert!(plan.shared_mem_bytes <= 227 * 1024, "{plan:?}");
}

#[test]
fn attention_impl_parses_names() {
    assert_eq!("v1".parse::<AttentionImpl>().unwrap(), AttentionImpl::V1);
    assert_eq!(" V2 ".parse::<AttentionImpl>().unwrap(), AttentionImpl::V2);
    assert_eq!(
        "wgmma".parse::<AttentionImpl>().unwrap(),
        AttentionImpl::Wgmma
    );
    let msg = format!("{:#}", "v3".parse::<AttentionImpl>().expect_err("v3"));
    assert!(
        msg.contains("\"v3\"") && msg.contains("v1") && msg.contains("v2"),
        "unclear error: {msg}"
    );
    for imp in AttentionImpl::ALL {
        assert_eq!(imp.name().parse::<AttentionImpl>().unwrap(), imp);
    }
    assert_eq!(
        "auto".parse::<AttentionImpl>().unwrap(),
        AttentionImpl::Auto
    );
}

#[test]
fn attention_auto_resolves_by_device() {
    let auto = AttentionImpl::Auto;
    let large = params(shape(256, 16, 256, 72), 0x1000, 0x2000);
    // The measured best on a Hopper (H200, 2026-11-26), v1 elsewhere.
    assert_eq!(auto.resolve(9), AttentionImpl::WgmmaMn);
    assert_eq!(auto.resolve(8), AttentionImpl::V1);
    assert_eq!(auto.resolve(10), AttentionImpl::V1);
    // Concrete implementations resolve to themselves; Auto itself has no plan.
    for imp in AttentionImpl::ALL {
        for cc in [8, 9] {
            assert_eq!(imp.resolve(cc), imp);
        }
    }
    let msg = format!(
        "{:#}",
        attention_plan_for(&large, auto).expect_err("Auto has no plan")
    );
    assert!(msg.contains("resolve"), "unclear error: {msg}");
}

/// A change that makes valid parameters invalid.
type ParamEdit = fn(&mut AttentionParams);

#[test]
fn attention_plan_rejects_bad_params() {
    let cases: [(&str, ParamEdit); 11] = [
        ("batch must be > 0", |p| p.batch = 0),
        ("tokens must be > 0", |p| p.tokens = 0),
        ("heads must be > 0", |p| p.heads = -1),
        ("exceeds the grid", |p| p.batch = 70000),
        ("scale must be finite", |p| p.scale = -0.1),
        ("scale must be finite", |p| p.scale = f32::NAN),
        ("qkv pointer is null", |p| p.qkv = 0),
        ("out pointer is null", |p| p.out = 0),
        ("not 16-byte aligned", |p| p.qkv = 0x1008),
        ("not 16-byte aligned", |p| p.out = 0x2002),
        ("not supported", |p| p.head_dim = 0),
    ];
    for imp in AttentionImpl::ALL {
        for (want, edit) in cases {
            let mut p = valid();
            edit(&mut p);
            match attention_plan_for(&p, imp) {
                Ok(_) => panic!(
                    "{}: expected an error containing {want:?} for {p:?}",
                    imp.name()
                ),
                Err(e) => {
                    let msg = format!("{e:#}");
                    assert!(
                        msg.contains(want),
                        "{}: expected {want:?}, got: {msg}",
                        imp.name()
                    );
                }
            }
        }
    }
}

/// Without a device: the plain-loop twin and the CPU oracle agree on odd shapes.
#[test]
fn attention_plain_loop_matches_cpu_oracle() {
    let mut rng = TestRng::new(10);
    for s in [
        shape(2, 3, 77, 72),
        shape(1, 2, 1, 64),
        shape(1, 1, 130, 128),
    ] {
        let n = s.batch * s.tokens * 3 * s.heads * s.head_dim;
        let qkv = round_bf16(&rng.normal_vec(n, 1.0));
        if let Err(e) = check_oracle(&format!("{s:?}"), &qkv, s) {
            panic!("{e:#}");
        }
    }
}

/// The CPU twin itself on a case small enough to check by hand: one query, two keys.
#[test]
fn attention_reference_hand_case() {
    // B=1, H=1, T=2, d=64: q0 = k0 = e0 * 8, k1 = 0, so scores (t=0) = [64/8, 0] = [8, 0].
    let s = shape(1, 1, 2, 64);
    let d = 64;
    let mut qkv = vec![0.0f32; 2 * 3 * d];
    qkv[0] = 8.0; // q of token 0
    qkv[d] = 8.0; // k of token 0
    qkv[2 * d] = 1.0; // v of token 0 = e0
    qkv[3 * d + 2 * d + 1] = 1.0; // v of token 1 = e1
    let out = attention_reference(&qkv, s);
    let p0 = 1.0 / (1.0 + (-8.0f32).exp());
    assert!((out[0] - p0).abs() < 1e-6 && (out[1] - (1.0 - p0)).abs() < 1e-6);
    // token 1: q = 0, both scores 0 -> uniform.
    assert!((out[d] - 0.5).abs() < 1e-6 && (out[d + 1] - 0.5).abs() < 1e-6);
}

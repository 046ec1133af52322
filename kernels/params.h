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
    FORA_EPI_BIAS_GATE_RESIDUAL = 3
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

/* The epilogue alone, over an f32 product acc[M, ld_acc] = A @ W^T (no bias) computed by another
 * GEMM (the cuBLASLt reference path): out = epilogue(acc + bias), same fields and meaning as in
 * GemmParams. Kernel gemm_epilogue_f32. */
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
} GemmEpilogueParams;

/* Flash attention over a fused qkv buffer as the qkv Linear writes it:
 * qkv bf16 [B, T, 3, H, d] (row stride 3*H*d); out bf16 [B, T, H, d]. */
typedef struct AttentionParams {
    fora_ptr qkv;
    fora_ptr out;
    int batch, tokens, heads, head_dim;
    float scale;       /* 1 / sqrt(head_dim) */
} AttentionParams;

#ifdef __cplusplus
}
#endif
#endif

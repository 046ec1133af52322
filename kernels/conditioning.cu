// Conditioning: the sinusoidal timestep embedding (input of the t-MLP), the t-MLP's inner SiLU,
// and c = t_emb + y_emb -> SiLU(c) (input of every adaLN Linear).
#include "common.cuh"

// One block per row, one thread per frequency j: writes cos at column j and sin at half + j.
// The f32 steps round as PyTorch's (and src/cpu/ops.rs timestep_features); exp, cos and sin are
// evaluated in double and rounded once. Arguments t * f reach 999 rad.
extern "C" __global__ void timestep_embedding(const TimestepEmbedParams p) {
    grid_dependency_sync();
    const int r = blockIdx.x;
    if (r >= p.rows) return;
    const float t = reinterpret_cast<const float*>(p.t)[r];
    __nv_bfloat16* out = reinterpret_cast<__nv_bfloat16*>(p.out) + (size_t)r * p.ldo;
    // -ln(10000) rounded to f32 times j, over half, as torch's f32 arange arithmetic.
    const float neg_log_max_period = -9.21034037197618f;
    for (int j = threadIdx.x; j < p.half; j += blockDim.x) {
        const float e = __fdiv_rn(__fmul_rn(neg_log_max_period, (float)j), (float)p.half);
        const float freq = (float)exp((double)e);  // rounded once, as PyTorch's f32 exp
        const float arg = __fmul_rn(t, freq);
        // cos/sin of the f32 argument via sincospi in double: its range reduction is exact and
        // needs no local-memory stack (cosf/sinf's Payne-Hanek path does); error ~1e-13.
        double s, c;
        sincospi((double)arg * 0.318309886183790671538, &s, &c);
        out[j] = f32_to_bf16((float)c);
        out[p.half + j] = f32_to_bf16((float)s);
    }
}

// Grid-stride over rows * cols.
extern "C" __global__ void silu_f32_bf16(const SiluParams p) {
    grid_dependency_sync();
    const long long total = (long long)p.rows * p.cols;
    const float* in = reinterpret_cast<const float*>(p.input);
    __nv_bfloat16* out = reinterpret_cast<__nv_bfloat16*>(p.out);
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long r = i / p.cols, c = i % p.cols;
        out[r * p.ldo + c] = f32_to_bf16(silu(in[r * p.ld_in + c]));
    }
}

// blockIdx.x = row (rows of all steps may exceed grid y's 65535), blockIdx.y x threads over dim.
extern "C" __global__ void label_silu(const LabelSiluParams p) {
    grid_dependency_sync();
    const int r = blockIdx.x;
    if (r >= p.rows) return;
    int y = reinterpret_cast<const int*>(p.labels)[r];
    y = min(max(y, 0), p.num_labels - 1);  // defensive: the host has validated the labels
    const float* t_emb = reinterpret_cast<const float*>(p.t_emb) + (size_t)r * p.ld_t;
    const float* emb = reinterpret_cast<const float*>(p.table) + (size_t)y * p.dim;
    __nv_bfloat16* out = reinterpret_cast<__nv_bfloat16*>(p.out) + (size_t)r * p.ldo;
    for (int d = blockIdx.y * blockDim.x + threadIdx.x; d < p.dim; d += gridDim.y * blockDim.x) {
        out[d] = f32_to_bf16(silu(__fadd_rn(t_emb[d], emb[d])));
    }
}

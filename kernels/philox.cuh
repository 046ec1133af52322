// The project's Gaussian noise on the device: Philox4x32-10 + Box-Muller, the exact recipe of
// src/rng.rs (read its module docs) so that one seed gives the same noise on CPU and GPU. Every
// f32 operation that must round as on the CPU is an explicit _rn intrinsic (no FMA contraction);
// log/cos/sin are evaluated in double (see box_muller).
#pragma once

#include <stdint.h>

#define FORA_PHILOX_DEVICE __device__ __forceinline__

struct PhiloxNormals {
    float v[4];
};

FORA_PHILOX_DEVICE uint4 philox4x32_10(uint4 c, uint2 k) {
    const uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u;
    const uint32_t W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            k.x += W0;
            k.y += W1;
        }
        const uint32_t hi0 = __umulhi(M0, c.x), lo0 = M0 * c.x;
        const uint32_t hi1 = __umulhi(M1, c.z), lo1 = M1 * c.z;
        c = make_uint4(hi1 ^ c.y ^ k.x, lo1, hi0 ^ c.w ^ k.y, lo0);
    }
    return c;
}

// (rad * cos(theta), rad * sin(theta)) from two u32, as rng.rs box_muller.
FORA_PHILOX_DEVICE float2 box_muller(uint32_t a, uint32_t b) {
    const float inv_2_24 = 1.0f / 16777216.0f;
    const float u = __fmul_rn(__uint2float_rn((a >> 8) + 1u), inv_2_24);  // (0, 1], exact
    const float v = __fmul_rn(__uint2float_rn(b >> 8), inv_2_24);         // [0, 1), exact
    // log, cos and sin of the f32 arguments evaluated in double and rounded once to f32: nearly
    // always the correctly rounded value, which host libm (glibc: < 1 ulp) also nearly always
    // returns; and sincospi's exact range reduction needs no local-memory stack (cosf/sinf's
    // Payne-Hanek path does, even when never taken).
    const float rad = sqrtf(__fmul_rn(-2.0f, (float)log((double)u)));
    const float theta = __fmul_rn(6.28318548202514648438f, v);  // 2*pi rounded to f32
    double s, c;
    sincospi((double)theta * 0.318309886183790671538, &s, &c);
    return make_float2(__fmul_rn(rad, (float)c), __fmul_rn(rad, (float)s));
}

// The four normals of Philox block `block` (indices 4*block .. 4*block + 3) of `stream`.
FORA_PHILOX_DEVICE PhiloxNormals philox_normal_block(unsigned long long seed,
                                                     unsigned long long stream,
                                                     unsigned long long block) {
    const uint2 key = make_uint2((uint32_t)seed, (uint32_t)(seed >> 32));
    const uint4 ctr = make_uint4((uint32_t)block, (uint32_t)(block >> 32), (uint32_t)stream,
                                 (uint32_t)(stream >> 32));
    const uint4 r = philox4x32_10(ctr, key);
    const float2 p0 = box_muller(r.x, r.y);
    const float2 p1 = box_muller(r.z, r.w);
    PhiloxNormals n;
    n.v[0] = p0.x;
    n.v[1] = p0.y;
    n.v[2] = p1.x;
    n.v[3] = p1.y;
    return n;
}

#!/usr/bin/env python3
"""Lane-level emulation of the v2 flash-attention kernel (attention_block_v2 in
kernels/attention.cu), for checking its index maths without a GPU.

Every index expression of the kernel is transcribed; ldmatrix (.trans) and mma.sync m16n8k16
use the PTX ISA fragment layouts. Shared memory starts as NaN, and cp.async groups are
modelled: a copy poisons its destination with NaN when issued and lands only when a
cp.async.wait_group retires its group, so reading a buffer before its data is guaranteed (or
while it is being refilled), or reading unwritten columns, shows up as NaN in the output.
__syncthreads is a phase boundary between the per-warp loops.

Keep it in step with the kernel when the kernel changes. Usage:
    python3 tools/attn_emulate.py                 # the default shapes
    python3 tools/attn_emulate.py 2,2,129,72,1.0  # B,H,T,d,q/k std
Prints rel-L2 against a float64 reference, NaN count and whether guard elements past the
output stayed untouched; exits 1 when any shape fails (rel-L2 > 1e-2, NaN, guard written).
Slow (pure numpy per lane): keep shapes small.
"""
import sys

import numpy as np

def bf16(x):
    x = np.asarray(x, dtype=np.float32)
    u = x.view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    out = r.astype(np.uint32).view(np.float32)
    return np.where(np.isnan(x), np.float32(np.nan), out)

LANE = np.arange(32)

def ldm(smem, addrs, n, trans):
    # addrs: (32,) element indices; returns list of n registers, each (32, 2) [lo, hi]
    regs = []
    for j in range(n):
        rows = addrs[8 * j: 8 * j + 8]
        r = np.zeros((32, 2), np.float32)
        for i in range(32):
            if not trans:
                base = rows[i // 4] + 2 * (i % 4)
                r[i] = smem[base], smem[base + 1]
            else:
                r[i] = smem[rows[2 * (i % 4)] + i // 4], smem[rows[2 * (i % 4) + 1] + i // 4]
        regs.append(r)
    return regs

def mma(c, a, b):
    # c: (32, 4) f32; a: 4 regs (32,2); b: 2 regs (32,2)
    A = np.full((16, 16), np.nan, np.float64)
    B = np.full((16, 8), np.nan, np.float64)
    for l in range(32):
        g, q = l >> 2, l & 3
        A[g, 2*q:2*q+2] = a[0][l]
        A[g+8, 2*q:2*q+2] = a[1][l]
        A[g, 2*q+8:2*q+10] = a[2][l]
        A[g+8, 2*q+8:2*q+10] = a[3][l]
        B[2*q:2*q+2, g] = b[0][l]
        B[2*q+8:2*q+10, g] = b[1][l]
    D = A @ B
    for l in range(32):
        g, q = l >> 2, l & 3
        c[l, 0] += D[g, 2*q]; c[l, 1] += D[g, 2*q+1]
        c[l, 2] += D[g+8, 2*q]; c[l, 3] += D[g+8, 2*q+1]

def mma_k8(c, a, b):
    # m16n8k8: a = 2 regs (rows g, g+8; k 2q, 2q+1), b = 1 reg (k 2q, 2q+1; n g); c as mma
    A = np.full((16, 8), np.nan, np.float64)
    B = np.full((8, 8), np.nan, np.float64)
    for l in range(32):
        g, q = l >> 2, l & 3
        A[g, 2*q:2*q+2] = a[0][l]
        A[g+8, 2*q:2*q+2] = a[1][l]
        B[2*q:2*q+2, g] = b[l]
    D = A @ B
    for l in range(32):
        g, q = l >> 2, l & 3
        c[l, 0] += D[g, 2*q]; c[l, 1] += D[g, 2*q+1]
        c[l, 2] += D[g+8, 2*q]; c[l, 3] += D[g+8, 2*q+1]

def pack(lo, hi):
    return np.stack([bf16(lo), bf16(hi)], axis=1)

def shfl_xor(v, m):
    return v[LANE ^ m]


def run_v2(qkv, out, B, T, H, D, scale):
    WARPS, MT, BN = 4, 2, 64
    WARP_M = 16 * MT
    BM = WARP_M * WARPS
    DK = (D + 15) // 16 * 16
    STRIDE = DK + 8
    CHUNKS = D // 8
    Q_ELEMS, KV_ELEMS = BM * STRIDE, BN * STRIDE
    THREADS = 32 * WARPS
    KSTEPS = D // 16
    HAS_K8 = D % 16 == 8
    Q_IN_REGS = DK <= 80
    row_stride = 3 * H * D
    n_tiles = (T + BN - 1) // BN
    NTO = D // 8
    sl = np.float32(np.float32(scale) * np.float32(1.4426950408889634))
    for batch in range(B):
        for head in range(H):
            for bx in range((T + BM - 1) // BM):
                smem = np.full(Q_ELEMS + 4 * KV_ELEMS, np.nan, np.float32)
                s_q, s_k, s_v = 0, Q_ELEMS, Q_ELEMS + 2 * KV_ELEMS
                q0 = bx * BM
                q_base = batch * T * row_stride + head * D
                k_base = q_base + H * D
                v_base = q_base + 2 * H * D
                groups = []   # committed groups, oldest first: lists of copies
                current = []  # copies issued since the last commit

                def load_rows(dst, src, rows, row0):
                    for tid in range(THREADS):
                        c = tid
                        while c < rows * CHUNKS:
                            r = c // CHUNKS; ch = c - r * CHUNKS
                            t = row0 + r; ok = t < T
                            g = src + (t if ok else 0) * row_stride + ch * 8
                            d_ = dst + r * STRIDE + ch * 8
                            assert g % 8 == 0 and d_ % 8 == 0 and 0 <= g and g + 8 <= qkv.size
                            assert s_q <= d_ and d_ + 8 <= smem.size
                            smem[d_:d_ + 8] = np.nan  # in flight: contents undefined
                            current.append((d_, g, ok))
                            c += THREADS

                def commit():
                    groups.append(list(current)); current.clear()

                def wait(n):
                    while len(groups) > n:
                        for d_, g_, ok in groups.pop(0):
                            smem[d_:d_ + 8] = qkv[g_:g_ + 8] if ok else 0.0

                load_rows(s_q, q_base, BM, q0)
                load_rows(s_k, k_base, BN, 0)
                commit()
                load_rows(s_v, v_base, BN, 0)
                commit()
                W = [dict(o=np.zeros((MT, NTO, 32, 4), np.float32),
                          m=np.full((MT, 2, 32), -np.inf, np.float32),
                          l=np.zeros((MT, 2, 32), np.float32), qf=None, s=None) for _ in range(WARPS)]
                quad_col = 2 * (LANE & 3)
                for j in range(n_tiles):
                    buf = j & 1
                    wait(1)  # + __syncthreads
                    if j + 1 < n_tiles:
                        load_rows(s_k + (buf ^ 1) * KV_ELEMS, k_base, BN, (j + 1) * BN)
                    commit()
                    kt = s_k + buf * KV_ELEMS
                    vt = s_v + buf * KV_ELEMS
                    for warp in range(WARPS):
                        st = W[warp]
                        s_q_warp = s_q + warp * WARP_M * STRIDE
                        qaddr = lambda mt, kk: s_q_warp + (mt * 16 + (LANE & 15)) * STRIDE + kk * 16 + (LANE >> 4) * 8
                        taddr = lambda mt: s_q_warp + (mt * 16 + (LANE & 15)) * STRIDE + (D - 8)
                        if Q_IN_REGS and j == 0:
                            st['qf'] = [[ldm(smem, qaddr(mt, kk), 4, False) for kk in range(KSTEPS)] for mt in range(MT)]
                            if HAS_K8:
                                st['qt'] = [ldm(smem, taddr(mt), 2, False) for mt in range(MT)]
                        s = np.zeros((MT, BN // 8, 32, 4), np.float32)
                        for kk in range(KSTEPS):
                            qa = [st['qf'][mt][kk] if Q_IN_REGS else ldm(smem, qaddr(mt, kk), 4, False) for mt in range(MT)]
                            for nn in range(BN // 16):
                                b = ldm(smem, kt + (nn * 16 + ((LANE >> 4) & 1) * 8 + (LANE & 7)) * STRIDE + kk * 16 + ((LANE >> 3) & 1) * 8, 4, False)
                                for mt in range(MT):
                                    mma(s[mt][2 * nn], qa[mt], b[0:2])
                                    mma(s[mt][2 * nn + 1], qa[mt], b[2:4])
                        if HAS_K8:
                            qt = [st['qt'][mt] if Q_IN_REGS else ldm(smem, taddr(mt), 2, False) for mt in range(MT)]
                            for n4 in range(BN // 32):
                                b = ldm(smem, kt + (n4 * 32 + LANE) * STRIDE + (D - 8), 4, False)
                                for i in range(4):
                                    for mt in range(MT):
                                        mma_k8(s[mt][4 * n4 + i], qt[mt], b[i])
                        if (j + 1) * BN > T:
                            for nt in range(BN // 8):
                                key = j * BN + nt * 8 + quad_col
                                for mt in range(MT):
                                    for e in (0, 2):
                                        s[mt][nt][:, e] = np.where(key >= T, -np.inf, s[mt][nt][:, e])
                                    for e in (1, 3):
                                        s[mt][nt][:, e] = np.where(key + 1 >= T, -np.inf, s[mt][nt][:, e])
                        for mt in range(MT):
                            tm = np.full((2, 32), -np.inf, np.float32)
                            for nt in range(BN // 8):
                                tm[0] = np.maximum(tm[0], np.maximum(s[mt][nt][:, 0], s[mt][nt][:, 1]))
                                tm[1] = np.maximum(tm[1], np.maximum(s[mt][nt][:, 2], s[mt][nt][:, 3]))
                            alpha = np.zeros((2, 32), np.float32); negm = np.zeros((2, 32), np.float32)
                            for r in range(2):
                                tm[r] = np.maximum(tm[r], shfl_xor(tm[r], 1))
                                tm[r] = np.maximum(tm[r], shfl_xor(tm[r], 2))
                                nm = np.maximum(st['m'][mt][r], tm[r] * sl)
                                with np.errstate(invalid='ignore'):
                                    alpha[r] = np.exp2(st['m'][mt][r] - nm)
                                st['m'][mt][r] = nm; negm[r] = -nm
                            ts = np.zeros((2, 32), np.float32)
                            for nt in range(BN // 8):
                                for e in range(4):
                                    s[mt][nt][:, e] = np.exp2(s[mt][nt][:, e] * sl + negm[e // 2])
                                ts[0] += s[mt][nt][:, 0] + s[mt][nt][:, 1]
                                ts[1] += s[mt][nt][:, 2] + s[mt][nt][:, 3]
                            st['l'][mt] = st['l'][mt] * alpha + ts
                            for i in range(NTO):
                                st['o'][mt][i][:, 0:2] *= alpha[0][:, None]
                                st['o'][mt][i][:, 2:4] *= alpha[1][:, None]
                        st['s'] = s
                    wait(1)  # + __syncthreads
                    if j + 1 < n_tiles:
                        load_rows(s_v + (buf ^ 1) * KV_ELEMS, v_base, BN, (j + 1) * BN)
                    commit()
                    for warp in range(WARPS):
                        st = W[warp]; s = st['s']
                        for kk in range(BN // 16):
                            a = [[pack(s[mt][2*kk][:, 0], s[mt][2*kk][:, 1]), pack(s[mt][2*kk][:, 2], s[mt][2*kk][:, 3]),
                                  pack(s[mt][2*kk+1][:, 0], s[mt][2*kk+1][:, 1]), pack(s[mt][2*kk+1][:, 2], s[mt][2*kk+1][:, 3])]
                                 for mt in range(MT)]
                            v_rows = vt + (kk * 16 + (LANE & 15)) * STRIDE
                            for dn in range(D // 16):
                                b = ldm(smem, v_rows + dn * 16 + (LANE >> 4) * 8, 4, True)
                                for mt in range(MT):
                                    mma(st['o'][mt][2 * dn], a[mt], b[0:2])
                                    mma(st['o'][mt][2 * dn + 1], a[mt], b[2:4])
                            if D % 16 == 8:
                                b = ldm(smem, v_rows + (D - 8), 2, True)
                                for mt in range(MT):
                                    mma(st['o'][mt][NTO - 1], a[mt], b)
                for warp in range(WARPS):
                    st = W[warp]
                    s_o = s_q + warp * WARP_M * STRIDE
                    g = LANE >> 2
                    for mt in range(MT):
                        inv = np.zeros((2, 32), np.float32)
                        for r in range(2):
                            l = st['l'][mt][r]
                            l = l + shfl_xor(l, 1)
                            l = l + shfl_xor(l, 2)
                            inv[r] = 1.0 / l
                        rows = s_o + mt * 16 * STRIDE
                        for i in range(NTO):
                            p0 = pack(st['o'][mt][i][:, 0] * inv[0], st['o'][mt][i][:, 1] * inv[0])
                            p1 = pack(st['o'][mt][i][:, 2] * inv[1], st['o'][mt][i][:, 3] * inv[1])
                            for l_ in range(32):
                                a0 = rows + g[l_] * STRIDE + i * 8 + quad_col[l_]
                                smem[a0:a0 + 2] = p0[l_]
                                a1 = rows + (g[l_] + 8) * STRIDE + i * 8 + quad_col[l_]
                                smem[a1:a1 + 2] = p1[l_]
                    for lane in range(32):
                        c = lane
                        while c < WARP_M * CHUNKS:
                            r = c // CHUNKS; ch = c - r * CHUNKS
                            t = q0 + warp * WARP_M + r
                            if t < T:
                                off = ((batch * T + t) * H + head) * D + ch * 8
                                out[off:off + 8] = smem[s_o + r * STRIDE + ch * 8: s_o + r * STRIDE + ch * 8 + 8]
                            c += 32


def reference(qkv, B, T, H, D):
    x = qkv.reshape(B, T, 3, H, D).astype(np.float64)
    q, k, v = x[:, :, 0], x[:, :, 1], x[:, :, 2]
    s = np.einsum('bthd,bshd->bhts', q, k) / np.sqrt(D)
    s -= s.max(-1, keepdims=True)
    p = np.exp(s); p /= p.sum(-1, keepdims=True)
    return np.einsum('bhts,bshd->bthd', p, v).reshape(-1)


DEFAULT_SHAPES = [(1, 1, 1, 72, 1.0), (1, 2, 77, 72, 1.0), (2, 1, 65, 64, 1.0), (1, 1, 130, 64, 1.0),
                  (1, 1, 70, 128, 1.0), (1, 1, 256, 72, 1.0), (1, 1, 200, 128, 3.0),
                  (1, 1, 300, 72, 3.0), (2, 2, 129, 72, 1.0)]


def main(argv):
    rng = np.random.default_rng(0)
    shapes = DEFAULT_SHAPES
    if argv:
        shapes = [tuple(float(v) if i == 4 else int(v) for i, v in enumerate(a.split(','))) for a in argv]
    ok_all = True
    for (B, H, T, D, qk) in shapes:
        x = rng.standard_normal((B * T, 3, H * D)).astype(np.float32)
        x[:, :2] *= qk
        qkv = bf16(x.reshape(-1))
        out = np.full(B * T * H * D + 64 * H * D, np.nan, np.float32)
        run_v2(qkv, out, B, T, H, D, np.float32(1.0 / np.sqrt(D)))
        ref = reference(qkv, B, T, H, D)
        o = out[:B * T * H * D]
        guard_ok = bool(np.isnan(out[B * T * H * D:]).all())
        with np.errstate(invalid='ignore'):
            err = float(np.sqrt(((o - ref) ** 2).sum() / (ref ** 2).sum()))
        nans = int(np.isnan(o).sum())
        ok = err <= 1e-2 and nans == 0 and guard_ok
        ok_all &= ok
        print(f"{'ok  ' if ok else 'FAIL'} B={B} H={H} T={T} d={D} qk_std={qk}: rel_l2={err:.3e} "
              f"nan={nans} guard_ok={guard_ok}", flush=True)
    return 0 if ok_all else 1


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))

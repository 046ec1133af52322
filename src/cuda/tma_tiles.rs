//! The warp-specialized TMA GEMM's tile variants (`gemm_tma_*` in `kernels/gemm_sm90.cu`: plain,
//! ping-pong, and clusters of 2 x 1, 4 x 1 and 4 x 2 CTAs that multicast the operand tiles), the
//! rules that pick one and its split-K slices for a shape, and the shapes' forced plans
//! (`FORA_TMA_TILES`). Pure: [`super::gemm::Gemm`] launches what [`TmaOverrides::plan`] says.
//! Re-exported from [`super::gemm`].

// For the docs' links only.
#[cfg(doc)]
use super::gemm::{Gemm, GemmImpl};
use anyhow::{bail, ensure, Context, Result};
use std::str::FromStr;

/// Tile variant of the warp-specialized TMA kernel (`gemm_tma_128x<BN>`, kernels/gemm_sm90.cu);
/// [`Gemm::run`] picks one, tests and benchmarks may force one with [`Gemm::run_tma`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TmaTile {
    /// 128 x 128, six stages.
    N128,
    /// 128 x 192, five stages: every DiT-XL/2 width is a multiple of 192.
    N192,
    /// 128 x 112, seven stages: at M = 512 qkv's 3456 columns in 124 tiles, one round of 132
    /// SMs (128 wide: 108 tiles of an eighth more work each).
    N112,
    /// 128 x 144, six stages: at M = 512 fc1's 4608 columns in 128 tiles, one round of 132
    /// SMs (192 wide: 96 tiles of a third more work each; 128 wide: 144 tiles, two rounds).
    N144,
    /// 128 x 256, four stages.
    N256,
    /// 256 x 128, four stages: each consumer warpgroup 128 x 128 (two m64 blocks, as in
    /// ping-pong) of the same tile, so a k-step reads 384 operand rows from L2 for 256 x 128
    /// outputs (the 128 x 128 tiles read 256 for half of them and are L2-bound at 256 rows on
    /// an H200: session 19's ncu). Forced only (`FORA_TMA_TILES`, tests, the bench's rows): on
    /// an H200 (session 19) no faster than `PingPong128`, so no pick chooses it.
    M256N128,
    /// 128 x 128, six stages, ping-pong: the two consumer warpgroups take whole tiles in turn,
    /// so one's epilogue runs while the other computes. [`TmaTile::pick`]'s for long K.
    PingPong128,
    /// `N128` in clusters of two CTAs along M that multicast the W tile: each CTA reads its
    /// A tile and half the W tile from L2 a k-step (`gemm_tma_mc_128x128`).
    Mc128,
    /// `N192` likewise (`gemm_tma_mc_128x192`).
    Mc192,
    /// `N256` likewise (`gemm_tma_mc_128x256`).
    Mc256,
    /// `PingPong128` likewise (`gemm_tma_mc_pp_128x128`).
    McPingPong128,
    /// `N128` with the staged epilogue (`gemm_tma_st_128x128`): each consumer warp writes its
    /// accumulators to shared memory (the slots of the unit's last two k-tiles, held back from
    /// the producer) and applies the epilogue from there in a rolled loop, whole rows of
    /// coalesced stores, instead of the register epilogue's straight-line code (whose
    /// instruction fetch stalled a third of the 256 x 128 tile's warps in session 19's ncu).
    /// Forced only until a device measures it against its twin.
    StagedN128,
    /// `PingPong128` with the staged epilogue (the slot of the unit's last k-tile).
    StagedPingPong128,
    /// `M256N128` with the staged epilogue.
    StagedM256N128,
    /// `N192` with the staged epilogue (two passes of 96 columns; five stages): the tile
    /// [`TmaTile::pick`] gave fc1 at M = 512 before `N144`.
    StagedN192,
    /// `N128` in clusters of four CTAs along M that multicast the W tile, a quarter each
    /// (`gemm_tma_c4x1_128x128`): at M = 512 a cluster covers every row, so each W tile is
    /// read from L2 once.
    C4x1N128,
    /// `N192` likewise (`gemm_tma_c4x1_128x192`).
    C4x1N192,
    /// `N128` in clusters of four along M by two along N (`gemm_tma_c4x2_128x128`): W
    /// multicast down a column of four, A (half each) along a row of two.
    C4x2N128,
    /// `N192` likewise (`gemm_tma_c4x2_128x192`).
    C4x2N192,
    /// 128 x 128 in clusters of two CTAs along K (`gemm_tma_k2_128x128`, four stages): both
    /// take the same tile, each half its k-tiles, and sum their accumulators through
    /// distributed shared memory before the epilogue, so a product of few tiles fills twice
    /// the SMs without split-K's epilogue kernel and f32 round trip.
    K2N128,
    /// The same in clusters of three (`gemm_tma_k3_128x128`): at M = 512 the 36 tiles of
    /// proj and fc2 on 108 SMs.
    K3N128,
    /// The same in clusters of four (`gemm_tma_k4_128x128`).
    K4N128,
}

impl TmaTile {
    /// Every tile, the 4 x 1 and 4 x 2 multicast ones, then the cluster split-K ones, last.
    pub const ALL: [TmaTile; 22] = [
        TmaTile::N128,
        TmaTile::N192,
        TmaTile::N112,
        TmaTile::N144,
        TmaTile::N256,
        TmaTile::M256N128,
        TmaTile::PingPong128,
        TmaTile::Mc128,
        TmaTile::Mc192,
        TmaTile::Mc256,
        TmaTile::McPingPong128,
        TmaTile::StagedN128,
        TmaTile::StagedPingPong128,
        TmaTile::StagedM256N128,
        TmaTile::StagedN192,
        TmaTile::C4x1N128,
        TmaTile::C4x1N192,
        TmaTile::C4x2N128,
        TmaTile::C4x2N192,
        TmaTile::K2N128,
        TmaTile::K3N128,
        TmaTile::K4N128,
    ];
    /// The cluster split-K tiles, which [`TmaTile::pick`] weighs against the cooperative one
    /// it chose.
    pub const CLUSTER_K: [TmaTile; 3] = [TmaTile::K2N128, TmaTile::K3N128, TmaTile::K4N128];
    /// The cooperative tiles, which [`TmaTile::pick`] chooses among.
    pub const COOPERATIVE: [TmaTile; 5] = [
        TmaTile::N112,
        TmaTile::N128,
        TmaTile::N144,
        TmaTile::N192,
        TmaTile::N256,
    ];
    /// The cooperative multicast tiles, which [`TmaTile::pick_multicast`] chooses among, the
    /// smallest clusters first.
    pub const MULTICAST: [TmaTile; 7] = [
        TmaTile::Mc128,
        TmaTile::Mc192,
        TmaTile::Mc256,
        TmaTile::C4x1N128,
        TmaTile::C4x1N192,
        TmaTile::C4x2N128,
        TmaTile::C4x2N192,
    ];
    /// Rows of most tiles (two consumer warpgroups of 64); [`TmaTile::bm`] is a tile's.
    pub const BM: u32 = 128;
    /// k-depth of a stage (one 128-byte swizzle row of bf16).
    pub const BK: u32 = 64;
    /// A producer and two consumer warpgroups.
    pub const THREADS: u32 = 384;

    /// Kernel name, BN, stages, ping-pong and the cluster's CTAs along M and N; must match
    /// gemm_sm90.cu's `FORA_TMA_BODY(BM, BN, STAGES, PINGPONG, CM, CN)` (BM: [`TmaTile::bm`]).
    fn spec(self) -> (&'static str, u32, u32, bool, u32, u32) {
        match self {
            TmaTile::N128 => ("gemm_tma_128x128", 128, 6, false, 1, 1),
            TmaTile::N192 => ("gemm_tma_128x192", 192, 5, false, 1, 1),
            TmaTile::N112 => ("gemm_tma_128x112", 112, 7, false, 1, 1),
            TmaTile::N144 => ("gemm_tma_128x144", 144, 6, false, 1, 1),
            TmaTile::N256 => ("gemm_tma_128x256", 256, 4, false, 1, 1),
            TmaTile::M256N128 => ("gemm_tma_256x128", 128, 4, false, 1, 1),
            TmaTile::PingPong128 => ("gemm_tma_pp_128x128", 128, 6, true, 1, 1),
            TmaTile::Mc128 => ("gemm_tma_mc_128x128", 128, 6, false, 2, 1),
            TmaTile::Mc192 => ("gemm_tma_mc_128x192", 192, 5, false, 2, 1),
            TmaTile::Mc256 => ("gemm_tma_mc_128x256", 256, 4, false, 2, 1),
            TmaTile::McPingPong128 => ("gemm_tma_mc_pp_128x128", 128, 6, true, 2, 1),
            TmaTile::StagedN128 => ("gemm_tma_st_128x128", 128, 6, false, 1, 1),
            TmaTile::StagedPingPong128 => ("gemm_tma_st_pp_128x128", 128, 6, true, 1, 1),
            TmaTile::StagedM256N128 => ("gemm_tma_st_256x128", 128, 4, false, 1, 1),
            TmaTile::StagedN192 => ("gemm_tma_st_128x192", 192, 5, false, 1, 1),
            TmaTile::C4x1N128 => ("gemm_tma_c4x1_128x128", 128, 6, false, 4, 1),
            TmaTile::C4x1N192 => ("gemm_tma_c4x1_128x192", 192, 5, false, 4, 1),
            TmaTile::C4x2N128 => ("gemm_tma_c4x2_128x128", 128, 6, false, 4, 2),
            TmaTile::C4x2N192 => ("gemm_tma_c4x2_128x192", 192, 5, false, 4, 2),
            TmaTile::K2N128 => ("gemm_tma_k2_128x128", 128, 4, false, 1, 1),
            TmaTile::K3N128 => ("gemm_tma_k3_128x128", 128, 4, false, 1, 1),
            TmaTile::K4N128 => ("gemm_tma_k4_128x128", 128, 4, false, 1, 1),
        }
    }

    /// CTAs a cluster (1: no multicast, no cluster split-K).
    pub fn cluster(self) -> u32 {
        self.cluster_m() * self.cluster_n() * self.cluster_k()
    }

    /// CTAs of a cluster along K: they take the same tile, each a run of its k-tiles, and sum
    /// their accumulators through distributed shared memory (gemm_sm90.cu's KS).
    pub fn cluster_k(self) -> u32 {
        match self {
            TmaTile::K2N128 => 2,
            TmaTile::K3N128 => 3,
            TmaTile::K4N128 => 4,
            _ => 1,
        }
    }

    /// CTAs of a cluster along M: they share (multicast) the W tile, each loading `bn /
    /// cluster_m` of its rows.
    pub fn cluster_m(self) -> u32 {
        self.spec().4
    }

    /// CTAs of a cluster along N: they share (multicast) the A tile, each loading `BM /
    /// cluster_n` of its rows.
    pub fn cluster_n(self) -> u32 {
        self.spec().5
    }

    /// CTAs of this tile's kernel resident at once on `sm_count` SMs (one a SM), in whole
    /// clusters (an estimate for a cluster of more than two: a GPU schedules a cluster within
    /// one GPC; the launcher asks the driver).
    pub fn resident(self, sm_count: usize) -> usize {
        let c = self.cluster() as usize;
        (sm_count / c).max(1) * c
    }

    /// The multicast counterpart of a tile (a multicast tile's is itself).
    pub fn multicast(self) -> TmaTile {
        match self {
            TmaTile::N128 => TmaTile::Mc128,
            TmaTile::N192 => TmaTile::Mc192,
            TmaTile::N256 => TmaTile::Mc256,
            TmaTile::PingPong128 => TmaTile::McPingPong128,
            other => other,
        }
    }

    /// The kernel's `extern "C"` name.
    pub fn kernel_name(self) -> &'static str {
        self.spec().0
    }

    /// The tile's width in N.
    pub fn bn(self) -> u32 {
        self.spec().1
    }

    /// The tile's rows (in M).
    pub fn bm(self) -> u32 {
        match self {
            TmaTile::M256N128 | TmaTile::StagedM256N128 => 256,
            _ => Self::BM,
        }
    }

    /// Whether the tile's kernel applies the staged epilogue (gemm_sm90.cu's STAGED).
    pub fn staged(self) -> bool {
        matches!(
            self,
            TmaTile::StagedN128
                | TmaTile::StagedPingPong128
                | TmaTile::StagedM256N128
                | TmaTile::StagedN192
        )
    }

    /// The benchmark row of this tile forced ("tma-128x192"); the automatic pick's row is "tma".
    pub fn bench_name(self) -> &'static str {
        match self {
            TmaTile::N128 => "tma-128x128",
            TmaTile::N192 => "tma-128x192",
            TmaTile::N112 => "tma-128x112",
            TmaTile::N144 => "tma-128x144",
            TmaTile::N256 => "tma-128x256",
            TmaTile::M256N128 => "tma-256x128",
            TmaTile::PingPong128 => "tma-pp-128x128",
            TmaTile::Mc128 => "tma-mc-128x128",
            TmaTile::Mc192 => "tma-mc-128x192",
            TmaTile::Mc256 => "tma-mc-128x256",
            TmaTile::McPingPong128 => "tma-mc-pp-128x128",
            TmaTile::StagedN128 => "tma-st-128x128",
            TmaTile::StagedPingPong128 => "tma-st-pp-128x128",
            TmaTile::StagedM256N128 => "tma-st-256x128",
            TmaTile::StagedN192 => "tma-st-128x192",
            TmaTile::C4x1N128 => "tma-c4x1-128x128",
            TmaTile::C4x1N192 => "tma-c4x1-128x192",
            TmaTile::C4x2N128 => "tma-c4x2-128x128",
            TmaTile::C4x2N192 => "tma-c4x2-128x192",
            TmaTile::K2N128 => "tma-k2-128x128",
            TmaTile::K3N128 => "tma-k3-128x128",
            TmaTile::K4N128 => "tma-k4-128x128",
        }
    }

    /// Whether this tile has run on a GPU (sessions 18 and 19, H200): `fora bench` times the
    /// others after every other GEMM row of a shape, so that a fault or a hang in a tile never
    /// run costs only its own rows. Update after a device call runs them.
    pub fn ran_on_a_gpu(self) -> bool {
        !matches!(
            self,
            TmaTile::N112
                | TmaTile::N144
                | TmaTile::StagedN128
                | TmaTile::StagedPingPong128
                | TmaTile::StagedM256N128
                | TmaTile::StagedN192
                | TmaTile::K2N128
                | TmaTile::K3N128
                | TmaTile::K4N128
        )
    }

    /// [`TmaTile::bench_name`] without its `tma-` prefix: the name `FORA_TMA_TILES` writes.
    pub fn setting_name(self) -> &'static str {
        &self.bench_name()["tma-".len()..]
    }

    /// The tile whose [`TmaTile::bench_name`] is `name`, with or without its `tma-` prefix.
    pub fn from_bench_name(name: &str) -> Option<TmaTile> {
        let name = name.trim();
        TmaTile::ALL
            .into_iter()
            .find(|t| t.bench_name() == name || t.setting_name() == name)
    }

    /// The stage ring, two 8-byte barriers a stage, two more (ping-pong's order barriers; all
    /// kernels reserve them), two more for the staged epilogue's meetings, for cluster split-K
    /// the reduction area (eight consumer warps' 16 x BN f32) and its 16 barriers, and 1 KiB
    /// the kernel spends on rounding its base up to the 1024-byte alignment of the swizzle
    /// atoms.
    pub fn smem_bytes(self) -> u32 {
        let (_, bn, stages, ..) = self.spec();
        let meetings = if self.staged() { 16 } else { 0 };
        let reduction = if self.cluster_k() > 1 {
            8 * 16 * bn * 4 + 16 * 8
        } else {
            0
        };
        stages * (self.bm() + bn) * Self::BK * 2 + stages * 16 + 16 + meetings + reduction + 1024
    }

    /// CTA tiles of an M x N product: output tiles (a cluster's CTAs each take one; a
    /// multicast tile's row and column tiles are counted in whole clusters, those past M
    /// computing zero rows and those past N zero columns), times the CTAs that share one along
    /// K (cluster split-K).
    pub fn tiles(self, m: usize, n: usize) -> usize {
        let (cm, cn) = (self.cluster_m() as usize, self.cluster_n() as usize);
        m.div_ceil(cm * self.bm() as usize)
            * cm
            * n.div_ceil(cn * self.bn() as usize)
            * cn
            * self.cluster_k() as usize
    }

    /// Relative throughput of a CTA on this tile while it computes, from the forced-tile rows
    /// of `fora bench` at 256 rows on an H200 (2026-11-26, after the epilogue issued its loads
    /// first), time per output tile-FLOP against 128: 192 within 2-4% either way (0.99 on
    /// average), 256 slower by 5-12% past its padding (qkv 1406 vs 1290 us, fc1 2045 vs 1815).
    /// 112 and 144 (session 26) are not yet measured: 0.97, a little below 128 and 192, so that
    /// they are picked only where they save a round or an eighth of a CTA's work.
    fn efficiency(self) -> f64 {
        match self {
            TmaTile::N128
            | TmaTile::PingPong128
            | TmaTile::Mc128
            | TmaTile::McPingPong128
            | TmaTile::C4x1N128
            | TmaTile::C4x2N128
            | TmaTile::M256N128
            | TmaTile::StagedN128
            | TmaTile::StagedPingPong128
            | TmaTile::StagedM256N128
            | TmaTile::K2N128
            | TmaTile::K3N128
            | TmaTile::K4N128 => 1.0,
            TmaTile::N192
            | TmaTile::Mc192
            | TmaTile::C4x1N192
            | TmaTile::C4x2N192
            | TmaTile::StagedN192 => 0.99,
            TmaTile::N112 | TmaTile::N144 => 0.97,
            TmaTile::N256 | TmaTile::Mc256 => 0.92,
        }
    }

    /// Estimated time of an M x N product on `sm_count` persistent CTAs, in k-tile columns: the
    /// busiest CTA's tiles (rounds of the grid) times the tile's width over its efficiency.
    /// Padding of N is counted (a padded tile costs a full one).
    fn cost(self, m: usize, n: usize, sm_count: usize) -> f64 {
        let rounds = self.tiles(m, n).div_ceil(self.resident(sm_count));
        rounds as f64 * self.bn() as f64 / self.efficiency()
    }

    /// Estimated time of an M x N x K product on this tile with `splits` split-K slices, in
    /// k-tile times of a 128-wide tile: rounds of the persistent grid times each CTA's k-tiles
    /// a unit plus, for cluster split-K, one k-tile time a cluster CTA for the reduction through
    /// distributed shared memory (a unit's), plus for `splits` > 1 what
    /// [`TmaTile::pick_splits`] charges for the epilogue kernel and the slices' round trip;
    /// scaled by the tile's width over its efficiency.
    fn plan_cost(self, mnk: (usize, usize, usize), splits: usize, sm_count: usize) -> f64 {
        let k_tile_times = self.k_tile_times(mnk, splits, sm_count, Self::SPLIT_LAUNCH);
        k_tile_times as f64 * self.bn() as f64 / (Self::BM as f64 * self.efficiency())
    }

    /// [`TmaTile::plan_cost`] in this tile's own k-tile times, with `launch` of them for a
    /// split's extra kernel: what [`TmaTile::pick_splits`] minimizes.
    fn k_tile_times(
        self,
        (m, n, k): (usize, usize, usize),
        splits: usize,
        sm_count: usize,
        launch: usize,
    ) -> usize {
        let k_tiles = k.div_ceil(Self::BK as usize);
        let ck = self.cluster_k() as usize;
        let rounds = (self.tiles(m, n) * splits).div_ceil(self.resident(sm_count));
        let depth = k_tiles.div_ceil(splits).div_ceil(ck);
        let reduce = if ck > 1 { ck } else { 0 };
        let split = if splits > 1 { launch + 3 * splits } else { 0 };
        rounds * (depth + reduce) + split
    }

    /// k-tile times [`TmaTile::pick_splits`] charges for split-K's epilogue kernel launch.
    const SPLIT_LAUNCH: usize = 10;

    /// Ping-pong 128 x 128 for a long K (at least [`TmaTile::PING_PONG_MIN_K`]) once every CTA
    /// has two or more tiles to alternate; else the cooperative tile of least
    /// `TmaTile::cost` (the wider on a tie), unless a cluster split-K tile
    /// ([`TmaTile::CLUSTER_K`]) costs less (`TmaTile::plan_cost`, against the cooperative
    /// tile with its own split-K slices): where the tiles leave most SMs idle. At M = 512 on
    /// 132 SMs: proj and fc2 (36 tiles) in clusters of three along K (108 CTAs; proj 6
    /// k-tiles each instead of 18, fc2 24 instead of 3 workspace slices of 24 and the epilogue
    /// kernel), the final layer's 4 tiles in clusters of four; qkv and fc1 in one round of
    /// the narrowest tiles that fit it (124 of 128 x 112, 128 of 128 x 144; session 26). Not
    /// yet measured on a device. On an H200 (2026-11-26) ping-pong ran fc2 at 256
    /// rows (K = 4608) in 1275 us against 1465 for the cooperative 128 x 128, and K = 1152 no
    /// faster (qkv 1507 against 1290). At DiT-XL/2 shapes: 128 wide at large M but for fc2; at
    /// M = 512 (one image + CFG) 128 wide where that fits one round (qkv, proj, fc2) and 192
    /// for fc1 (144 tiles of 128 would take two rounds on 132 SMs; measured 21.0 against 27.6
    /// us), before the 112- and 144-wide tiles.
    pub fn pick(m: usize, n: usize, k: usize, sm_count: usize) -> TmaTile {
        if k >= Self::PING_PONG_MIN_K && TmaTile::PingPong128.tiles(m, n) >= 2 * sm_count {
            return TmaTile::PingPong128;
        }
        let mut best = TmaTile::N128;
        for t in TmaTile::COOPERATIVE {
            if t.cost(m, n, sm_count) <= best.cost(m, n, sm_count) {
                best = t;
            }
        }
        let splits = best.splits_by_cost(m, n, k, sm_count, usize::MAX, Self::SPLIT_LAUNCH);
        let mut best_cost = best.plan_cost((m, n, k), splits as usize, sm_count);
        for t in TmaTile::CLUSTER_K {
            let cost = t.plan_cost((m, n, k), 1, sm_count);
            if cost < best_cost {
                (best, best_cost) = (t, cost);
            }
        }
        best
    }

    /// The shortest K [`TmaTile::pick`] runs ping-pong for.
    pub const PING_PONG_MIN_K: usize = 2048;

    /// The multicast tile of [`GemmImpl::TmaMulticast`]: ping-pong in pairs where
    /// [`TmaTile::pick`] runs ping-pong; else the tile of [`TmaTile::MULTICAST`] of least
    /// `TmaTile::cost` (tiles past M or N in a cluster count as whole ones) and, on a tie, of
    /// least L2 reads (`TmaTile::l2_rows`). At M = 512 (one image + CFG, 132 SMs): qkv and
    /// proj 4 x 2 clusters of 128 x 128, fc1 4 x 2 of 128 x 192, fc2 4 x 2 of 128 x 128 (in 3
    /// split-K slices); at large M, 4 x 1 of 128 x 128 (4 x 2 would pad qkv's N = 3456 to
    /// 3584). Not yet measured on a device.
    pub fn pick_multicast(m: usize, n: usize, k: usize, sm_count: usize) -> TmaTile {
        let plain = TmaTile::pick(m, n, k, sm_count);
        if plain == TmaTile::PingPong128 {
            return plain.multicast();
        }
        let key = |t: TmaTile| (t.cost(m, n, sm_count), t.l2_rows(m, n));
        let mut best = TmaTile::Mc128;
        for t in TmaTile::MULTICAST {
            let (cost, rows) = key(t);
            let (best_cost, best_rows) = key(best);
            if cost < best_cost || (cost == best_cost && rows < best_rows) {
                best = t;
            }
        }
        best
    }

    /// Operand rows every CTA of an M x N product reads from L2 a k-step, summed: its slices
    /// of the A and W tiles (the rest arrive by multicast), zero tiles included (they load
    /// their slices too).
    fn l2_rows(self, m: usize, n: usize) -> usize {
        let slices = self.bm() / self.cluster_n() + self.bn() / self.cluster_m();
        self.tiles(m, n) * slices as usize
    }

    /// Split-K slices when the tiles fall short of the SMs: the count (at most 8, at least 8
    /// k-tiles a slice, within `workspace` f32 elements) that minimizes the busiest CTA's
    /// k-tiles (rounds of the persistent grid times k-tiles a slice) plus what splitting costs
    /// in k-tile times: 10 for the epilogue kernel's launch and 3 a slice for its partial sums'
    /// round trip (at M = 512: a 128 x 128 k-tile is ~0.28 us at the tensor-core peak, a slice
    /// of 512 x 1152 f32 ~0.8 us of HBM traffic); fewer slices on a tie. E.g. fc2 of one
    /// image + CFG (36 tiles, 72 k-tiles): 3 slices (108 units, one round of 24 k-tiles), not 4
    /// (144 units, two rounds of 18); proj (18 k-tiles): none. Not yet tuned on a device.
    pub fn pick_splits(
        self,
        m: usize,
        n: usize,
        k: usize,
        sm_count: usize,
        workspace: usize,
    ) -> u32 {
        self.splits_by_cost(m, n, k, sm_count, workspace, Self::SPLIT_LAUNCH)
    }

    /// [`TmaTile::pick_splits`] for slices that a later pass sums as it loads them
    /// (`Gemm::tma_product_split`, for `residual_layernorm`): no epilogue kernel to pay for,
    /// only the slices' round trip. Never fewer slices than `pick_splits`. E.g. proj of one
    /// image + CFG in 4 x 2 clusters (40 CTAs, 18 k-tiles): 2 slices of 9 instead of none.
    pub fn pick_splits_summed(
        self,
        m: usize,
        n: usize,
        k: usize,
        sm_count: usize,
        workspace: usize,
    ) -> u32 {
        self.splits_by_cost(m, n, k, sm_count, workspace, 0)
    }

    /// The split rule of [`TmaTile::pick_splits`] with `launch` k-tile times for a split's
    /// extra kernel (k-tiles counted a CTA: a cluster split-K tile's CTAs share a unit's).
    fn splits_by_cost(
        self,
        m: usize,
        n: usize,
        k: usize,
        sm_count: usize,
        workspace: usize,
        launch: usize,
    ) -> u32 {
        let k_tiles = k
            .div_ceil(Self::BK as usize)
            .div_ceil(self.cluster_k() as usize);
        if self.tiles(m, n) >= self.resident(sm_count) {
            return 1;
        }
        let cost = |s: usize| self.k_tile_times((m, n, k), s, sm_count, launch);
        let mut best = 1;
        for s in 2..=8usize {
            if k_tiles / s < 8 || s * m * n > workspace {
                break;
            }
            if cost(s) < cost(best) {
                best = s;
            }
        }
        best as u32
    }
}

/// One forced TMA GEMM plan: the tile, and the split-K slices (`None`: picked by shape) of
/// every GEMM of N x K.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TmaOverride {
    /// Output columns of the GEMMs it applies to.
    pub n: u32,
    /// Depth of the GEMMs it applies to.
    pub k: u32,
    /// The tile they run on.
    pub tile: TmaTile,
    /// Their split-K slices (1..=8); `None` keeps the pick's.
    pub splits: Option<u32>,
}

/// TMA tiles forced by GEMM shape (`FORA_TMA_TILES`): on a device without a Rust toolchain
/// (the lent GPU machines) the tiles and slices the bench's forced rows found fastest can be
/// tried in whole steps without a rebuild. Applies to [`GemmImpl::Tma`] and
/// [`GemmImpl::TmaMulticast`] (not at M <= 64, which runs the 64-row wgmma kernel). Written
/// `NxK=tile[/splits]`, comma-separated, the tile as in the bench's rows with or without
/// `tma-` (`3456x1152=c4x2-128x128,1152x4608=mc-128x128/3`); empty: none. A fixed capacity
/// keeps [`super::CudaOptions`] `Copy`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TmaOverrides {
    entries: [Option<TmaOverride>; TmaOverrides::CAPACITY],
}

impl TmaOverrides {
    /// Most shapes one setting names (a DiT block has four GEMM shapes).
    pub const CAPACITY: usize = 8;

    /// The forced plan of GEMMs of N x K, if any.
    pub fn get(&self, n: usize, k: usize) -> Option<TmaOverride> {
        self.entries
            .iter()
            .flatten()
            .find(|o| o.n as usize == n && o.k as usize == k)
            .copied()
    }

    /// Whether nothing is forced.
    pub fn is_empty(&self) -> bool {
        self.entries.iter().all(Option::is_none)
    }

    /// The forced plans, in the order written.
    pub fn iter(&self) -> impl Iterator<Item = TmaOverride> + '_ {
        self.entries.iter().flatten().copied()
    }

    /// The plans for which `keep` holds, in the same order.
    pub fn retain(&self, keep: impl Fn(&TmaOverride) -> bool) -> TmaOverrides {
        let mut out = TmaOverrides::default();
        for (slot, o) in out.entries.iter_mut().zip(self.iter().filter(|o| keep(o))) {
            *slot = Some(o);
        }
        out
    }

    /// These plans and `other`'s together (this one's first), or `None` where both force one
    /// shape differently or the two hold more than [`TmaOverrides::CAPACITY`] shapes.
    pub fn union(&self, other: &TmaOverrides) -> Option<TmaOverrides> {
        let mut out = *self;
        let mut count = self.iter().count();
        for o in other.iter() {
            match self.get(o.n as usize, o.k as usize) {
                Some(mine) if mine == o => {}
                Some(_) => return None,
                None if count < TmaOverrides::CAPACITY => {
                    out.entries[count] = Some(o);
                    count += 1;
                }
                None => return None,
            }
        }
        Some(out)
    }

    /// The TMA plan (tile, split-K slices) of an M x N x K GEMM on `sm_count` SMs with
    /// `workspace` f32 elements of split-K room: the forced tile and slices where these name
    /// N x K, else [`TmaTile::pick_multicast`]'s tile (`multicast`, M past one row tile) or
    /// [`TmaTile::pick`]'s, and the tile's [`TmaTile::pick_splits`] (or, `summed`, for slices a
    /// later pass sums, [`TmaTile::pick_splits_summed`]). Pure: what [`Gemm`] launches.
    pub fn plan(
        &self,
        multicast: bool,
        (m, n, k): (usize, usize, usize),
        sm_count: usize,
        workspace: usize,
        summed: bool,
    ) -> (TmaTile, u32) {
        let forced = self.get(n, k);
        let tile = match forced {
            Some(o) => o.tile,
            None if multicast && m > TmaTile::BM as usize => {
                TmaTile::pick_multicast(m, n, k, sm_count)
            }
            None => TmaTile::pick(m, n, k, sm_count),
        };
        let splits = match forced.and_then(|o| o.splits) {
            Some(s) => s,
            None if summed => tile.pick_splits_summed(m, n, k, sm_count, workspace),
            None => tile.pick_splits(m, n, k, sm_count, workspace),
        };
        (tile, splits)
    }
}

impl FromStr for TmaOverrides {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<TmaOverrides> {
        let mut out = TmaOverrides::default();
        let entries = s.split(',').map(str::trim).filter(|e| !e.is_empty());
        for (count, entry) in entries.enumerate() {
            let syntax = || {
                format!(
                    "TMA tile override {entry:?}: expected NxK=tile[/splits], e.g. \
                     3456x1152=c4x2-128x128 or 1152x4608=mc-128x128/3"
                )
            };
            let (shape, plan) = entry.split_once('=').with_context(syntax)?;
            let (n, k) = shape.trim().split_once('x').with_context(syntax)?;
            let n: u32 = n.trim().parse().with_context(syntax)?;
            let k: u32 = k.trim().parse().with_context(syntax)?;
            ensure!(n > 0 && k > 0, "{}: N and K must be positive", syntax());
            let (tile, splits) = match plan.split_once('/') {
                Some((t, sp)) => (t, Some(sp)),
                None => (plan, None),
            };
            let name = tile.trim();
            let tile = TmaTile::from_bench_name(name).with_context(|| {
                let names: Vec<&str> = TmaTile::ALL.iter().map(|t| t.bench_name()).collect();
                format!("TMA tile override {entry:?}: unknown tile {name:?}; one of {names:?}")
            })?;
            let splits = match splits {
                None => None,
                Some(sp) => match sp.trim().parse::<u32>() {
                    Ok(v) if (1..=8).contains(&v) => Some(v),
                    _ => bail!("TMA tile override {entry:?}: split-K slices must be 1..=8"),
                },
            };
            ensure!(
                out.get(n as usize, k as usize).is_none(),
                "TMA tile override {entry:?}: shape {n}x{k} is named twice"
            );
            ensure!(
                count < TmaOverrides::CAPACITY,
                "TMA tile overrides: at most {} shapes",
                TmaOverrides::CAPACITY
            );
            out.entries[count] = Some(TmaOverride { n, k, tile, splits });
        }
        Ok(out)
    }
}

impl std::fmt::Display for TmaOverrides {
    /// The setting that parses back to these overrides (`FORA_TMA_TILES`).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, o) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{}x{}={}", o.n, o.k, o.tile.setting_name())?;
            if let Some(s) = o.splits {
                write!(f, "/{s}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::gemm::SPLITK_WORKSPACE;

    #[test]
    fn tma_tile_pick() {
        // At M = 65536 (the cost model: rounds x width / efficiency, the H200's efficiencies)
        // 128 wide for qkv, proj and fc1 (K = 1152), ping-pong for fc2 (K = 4608).
        assert_eq!(TmaTile::pick(65_536, 1152, 1152, 132), TmaTile::N128);
        assert_eq!(TmaTile::pick(65_536, 3456, 1152, 132), TmaTile::N128);
        assert_eq!(TmaTile::pick(65_536, 4608, 1152, 132), TmaTile::N128);
        assert_eq!(TmaTile::pick(65_536, 1152, 4608, 132), TmaTile::PingPong128);
        // One image pair (M = 512): qkv in one round of 124 tiles of 112 (108 of 128, 96 of
        // 144 and 72 of 192 are one round too, of wider tiles); proj's and fc2's 36 in
        // clusters of three along K (108 CTAs: proj 6 k-tiles a CTA against 18, fc2 24 against
        // 3 workspace slices of 24 and the epilogue kernel; four along K would take two
        // rounds); fc2's tiles are too few to alternate.
        assert_eq!(TmaTile::pick(512, 1152, 1152, 132), TmaTile::K3N128);
        assert_eq!(TmaTile::pick(512, 3456, 1152, 132), TmaTile::N112);
        assert_eq!(TmaTile::pick(512, 1152, 4608, 132), TmaTile::K3N128);
        // fc1: 128 tiles of 144 in one round (144 of 128 would take two, 96 of 192 are a third
        // wider, 168 of 112 two rounds, and 432 CTAs of three along K four).
        assert_eq!(TmaTile::pick(512, 4608, 1152, 132), TmaTile::N144);
        assert_eq!(TmaTile::N144.tiles(512, 4608), 128);
        assert_eq!(TmaTile::N112.tiles(512, 3456), 124);
        // A width only 128 divides.
        assert_eq!(TmaTile::pick(65_536, 640, 1152, 132), TmaTile::N128);
        // 192 where 128 would take a round more: 64 x 1152 (= 72 x 128 tiles).
        assert_eq!(TmaTile::pick(8192, 1152, 1152, 132), TmaTile::N192);
        // The final layer (N = 32): one 128-wide tile pads least, its 4 tiles in clusters of
        // three along K (four: the same cost, the smaller cluster kept).
        assert_eq!(TmaTile::pick(512, 32, 1152, 132), TmaTile::K3N128);
        // Enough tiles for every SM (eight image pairs): never split along K; 1152 = 8 x 144,
        // 256 tiles in two rounds where 288 of 128 take three.
        assert_eq!(TmaTile::pick(4096, 1152, 1152, 132), TmaTile::N144);
        assert_eq!(TmaTile::pick(4096, 1152, 4608, 132), TmaTile::PingPong128);
        assert_eq!(TmaTile::N192.tiles(65_536, 1152), 512 * 6);
    }

    #[test]
    fn tma_cluster_k_tiles() {
        for (t, ck) in TmaTile::CLUSTER_K.into_iter().zip(2..) {
            assert_eq!((t.cluster_k(), t.cluster()), (ck, ck), "{t:?}");
            assert_eq!((t.cluster_m(), t.cluster_n()), (1, 1), "{t:?}");
            assert_eq!((t.bm(), t.bn()), (128, 128), "{t:?}");
            // Each output tile counts its cluster's CTAs.
            assert_eq!(t.tiles(512, 1152), 36 * ck as usize, "{t:?}");
            // The ring of four stages, the barriers, the 64 KiB reduction area and its 16
            // barriers, the alignment slack: within a Hopper CTA's 227 KiB.
            assert_eq!(
                t.smem_bytes(),
                4 * 256 * 128 + 64 + 16 + 65_536 + 128 + 1024
            );
            assert!(t.smem_bytes() <= 227 * 1024);
            assert!(t.kernel_name().starts_with(&format!("gemm_tma_k{ck}_")));
            assert_eq!(TmaTile::from_bench_name(t.setting_name()), Some(t));
        }
        assert_eq!(TmaTile::K3N128.resident(132), 132);
        assert_eq!(TmaTile::K4N128.resident(130), 128);
        // A cluster split-K tile adds workspace slices only where its CTAs still fall short.
        let ws = usize::MAX;
        assert_eq!(TmaTile::K3N128.pick_splits(512, 1152, 4608, 132, ws), 1);
        assert!(TmaTile::K2N128.pick_splits(128, 32, 16_384, 132, ws) > 1);
    }

    #[test]
    fn tma_multicast_tiles() {
        // Each tile has a multicast twin of the same width, smem and stages, in clusters of
        // two.
        for (plain, mc) in [
            (TmaTile::N128, TmaTile::Mc128),
            (TmaTile::N192, TmaTile::Mc192),
            (TmaTile::N256, TmaTile::Mc256),
            (TmaTile::PingPong128, TmaTile::McPingPong128),
        ] {
            assert_eq!(plain.multicast(), mc);
            assert_eq!(mc.multicast(), mc);
            assert_eq!((plain.cluster(), mc.cluster()), (1, 2));
            assert_eq!(plain.bn(), mc.bn());
            assert_eq!(plain.smem_bytes(), mc.smem_bytes());
            assert!(mc.kernel_name().starts_with("gemm_tma_mc_"));
        }
        // Row tiles in whole clusters: 3 tiles of 128 rows (M = 300) make two pairs, the last
        // CTA computing zero rows; an even count is unchanged.
        assert_eq!(TmaTile::Mc128.tiles(300, 256), 4 * 2);
        assert_eq!(TmaTile::N128.tiles(300, 256), 3 * 2);
        assert_eq!(
            TmaTile::Mc192.tiles(65_536, 1152),
            TmaTile::N192.tiles(65_536, 1152)
        );
        // The A and W boxes a CTA loads (its slices of the tiles) stay whole 1024-byte swizzle
        // atoms, and a cluster is at most 8 CTAs (the portable limit).
        for t in TmaTile::ALL {
            assert_eq!(t.bn() % t.cluster_m(), 0, "{t:?}");
            assert_eq!(
                (t.bn() / t.cluster_m()) * TmaTile::BK * 2 % 1024,
                0,
                "{t:?}"
            );
            assert_eq!(t.bm() % t.cluster_n(), 0, "{t:?}");
            assert_eq!(
                (t.bm() / t.cluster_n()) * TmaTile::BK * 2 % 1024,
                0,
                "{t:?}"
            );
            assert!(t.cluster() <= 8, "{t:?}");
        }
        // 4 x 2 clusters: rows in fours, columns in pairs of tiles, the rest zero tiles. M = 300
        // (3 row tiles) and N = 392 (4 tiles of 128, the last partial) make one cluster row of
        // two cluster columns.
        assert_eq!(TmaTile::C4x2N128.tiles(300, 392), 4 * 4);
        assert_eq!(TmaTile::C4x2N192.tiles(300, 392), 4 * 4);
        assert_eq!(TmaTile::C4x1N128.tiles(512, 3456), 4 * 27);
        assert_eq!(TmaTile::C4x2N128.tiles(512, 3456), 4 * 28);
        // Resident CTAs in whole clusters.
        assert_eq!(TmaTile::C4x2N128.resident(132), 128);
        assert_eq!(TmaTile::C4x1N128.resident(132), 132);
        assert_eq!(TmaTile::N128.resident(132), 132);
        assert_eq!(TmaTile::C4x2N128.resident(4), 8);
    }

    #[test]
    fn tma_overrides_parse() {
        // Forced plans by shape: the tile with or without "tma-", slices optional.
        let o: TmaOverrides = " 3456x1152=c4x2-128x128 , 1152x4608=tma-mc-128x128/3,"
            .parse()
            .unwrap();
        assert_eq!(o.get(3456, 1152).unwrap().tile, TmaTile::C4x2N128);
        assert_eq!(o.get(3456, 1152).unwrap().splits, None);
        assert_eq!(o.get(1152, 4608).unwrap().tile, TmaTile::Mc128);
        assert_eq!(o.get(1152, 4608).unwrap().splits, Some(3));
        assert!(o.get(1152, 1152).is_none());
        // Said back in the form it parses from.
        assert_eq!(
            o.to_string(),
            "3456x1152=c4x2-128x128,1152x4608=mc-128x128/3"
        );
        assert_eq!(o.to_string().parse::<TmaOverrides>().unwrap(), o);
        // device_suite.sh's STAGED_TILES (variant tma_staged).
        let staged: TmaOverrides = "3456x1152=st-128x128,1152x4608=st-pp-128x128"
            .parse()
            .unwrap();
        assert_eq!(staged.get(3456, 1152).unwrap().tile, TmaTile::StagedN128);
        assert_eq!(
            staged.get(1152, 4608).unwrap().tile,
            TmaTile::StagedPingPong128
        );
        // Empty: nothing forced.
        assert!("".parse::<TmaOverrides>().unwrap().is_empty());
        assert!(" , ".parse::<TmaOverrides>().unwrap().is_empty());
        // Every tile by its bench name.
        for t in TmaTile::ALL {
            assert_eq!(TmaTile::from_bench_name(t.bench_name()), Some(t));
        }
        // Refused, with the reason.
        for (bad, why) in [
            ("3456x1152", "expected NxK=tile"),
            ("3456*1152=128x128", "expected NxK=tile"),
            ("0x1152=128x128", "positive"),
            ("3456x1152=128x96", "unknown tile"),
            ("3456x1152=128x128/0", "1..=8"),
            ("3456x1152=128x128/9", "1..=8"),
            ("3456x1152=128x128,3456x1152=128x192", "named twice"),
            (
                "1x8=128x128,2x8=128x128,3x8=128x128,4x8=128x128,5x8=128x128,6x8=128x128,\
                 7x8=128x128,8x8=128x128,9x8=128x128",
                "at most 8",
            ),
        ] {
            let err = format!("{:#}", bad.parse::<TmaOverrides>().unwrap_err());
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn tma_plans_with_overrides() {
        let none = TmaOverrides::default();
        let ws = SPLITK_WORKSPACE;
        // Nothing forced: the picks (fc2 at 2 rows: 4 x 2 clusters in 3 slices with tma_mc,
        // clusters of three along K without multicast; proj 1 slice, 2 for a summing pass).
        let fc2 = (512, 1152, 4608);
        assert_eq!(none.plan(true, fc2, 132, ws, false), (TmaTile::C4x2N128, 3));
        assert_eq!(none.plan(false, fc2, 132, ws, false), (TmaTile::K3N128, 1));
        assert_eq!(none.plan(false, fc2, 132, ws, true), (TmaTile::K3N128, 1));
        let proj = (512, 1152, 1152);
        assert_eq!(
            none.plan(true, proj, 132, ws, false),
            (TmaTile::C4x2N128, 1)
        );
        assert_eq!(none.plan(true, proj, 132, ws, true), (TmaTile::C4x2N128, 2));
        // One row tile: no multicast (its 9 tiles in clusters of three along K).
        assert_eq!(
            none.plan(true, (128, 1152, 1152), 132, ws, false).0,
            TmaTile::K3N128
        );
        // Forced: the tile, and the slices where given (else the forced tile's pick), for
        // either implementation and any M; other shapes keep their picks.
        let o: TmaOverrides = "1152x4608=c4x1-128x192/2,1152x1152=mc-128x128"
            .parse()
            .unwrap();
        for multicast in [false, true] {
            for summed in [false, true] {
                assert_eq!(
                    o.plan(multicast, fc2, 132, ws, summed),
                    (TmaTile::C4x1N192, 2)
                );
            }
        }
        assert_eq!(
            o.plan(true, proj, 132, ws, true),
            (
                TmaTile::Mc128,
                TmaTile::Mc128.pick_splits_summed(512, 1152, 1152, 132, ws)
            )
        );
        let qkv = (512, 3456, 1152);
        assert_eq!(
            o.plan(true, qkv, 132, ws, false),
            none.plan(true, qkv, 132, ws, false)
        );
    }

    #[test]
    fn tma_multicast_pick() {
        // One image + CFG (M = 512) on 132 SMs: every DiT-XL/2 GEMM in 4 x 2 clusters, the
        // one-round tile of least width (a tie goes to the larger cluster).
        assert_eq!(
            TmaTile::pick_multicast(512, 3456, 1152, 132),
            TmaTile::C4x2N128
        );
        assert_eq!(
            TmaTile::pick_multicast(512, 1152, 1152, 132),
            TmaTile::C4x2N128
        );
        // fc1: 144 tiles of 128 would take two rounds; 96 of 192 take one.
        assert_eq!(
            TmaTile::pick_multicast(512, 4608, 1152, 132),
            TmaTile::C4x2N192
        );
        assert_eq!(
            TmaTile::pick_multicast(512, 1152, 4608, 132),
            TmaTile::C4x2N128
        );
        // fc2 then in 3 slices: 40 CTAs (one cluster column past N = 1152) x 3 in one round.
        assert_eq!(
            TmaTile::C4x2N128.pick_splits(512, 1152, 4608, 132, 8 << 20),
            3
        );
        assert_eq!(
            TmaTile::C4x2N128.pick_splits_summed(512, 1152, 4608, 132, 8 << 20),
            3
        );
        // proj: no split with an epilogue kernel to pay for, 2 slices of 9 k-tiles for the fused
        // LayerNorm; qkv and fc1 fill a round unsplit either way.
        assert_eq!(
            TmaTile::C4x2N128.pick_splits(512, 1152, 1152, 132, 8 << 20),
            1
        );
        assert_eq!(
            TmaTile::C4x2N128.pick_splits_summed(512, 1152, 1152, 132, 8 << 20),
            2
        );
        assert_eq!(
            TmaTile::C4x2N128.pick_splits_summed(512, 3456, 1152, 132, 8 << 20),
            1
        );
        assert_eq!(
            TmaTile::C4x2N192.pick_splits_summed(512, 4608, 1152, 132, 8 << 20),
            1
        );
        // Never fewer slices than with the epilogue kernel.
        for (m, n, k) in [
            (512, 1152, 4608),
            (512, 256, 18_432),
            (300, 392, 520),
            (65_536, 1152, 4608),
        ] {
            for t in TmaTile::ALL {
                assert!(
                    t.pick_splits_summed(m, n, k, 132, 8 << 20)
                        >= t.pick_splits(m, n, k, 132, 8 << 20),
                    "{t:?} {m} {n} {k}"
                );
            }
        }
        // Large M: 4 x 1 of 128 (4 x 2 would pad N = 3456 to 3584 and leave 4 SMs idle).
        assert_eq!(
            TmaTile::pick_multicast(65_536, 3456, 1152, 132),
            TmaTile::C4x1N128
        );
        // Ping-pong where the plain pick runs it: its pair twin.
        assert_eq!(
            TmaTile::pick_multicast(65_536, 1152, 4608, 132),
            TmaTile::McPingPong128
        );
        // Two row tiles: the pair (4 along M would double the tiles).
        assert_eq!(
            TmaTile::pick_multicast(256, 1152, 1152, 132),
            TmaTile::Mc128
        );
        for t in TmaTile::MULTICAST {
            assert!(t.cluster() > 1 && t.multicast() == t, "{t:?}");
        }
    }

    #[test]
    fn tma_smem_and_splits() {
        // STAGES * (128 + BN) * 64 * 2 + 16 bytes of barriers a stage + 16 (order barriers) +
        // 1 KiB, per gemm_sm90.cu.
        assert_eq!(
            TmaTile::N128.smem_bytes(),
            6 * 256 * 128 + 6 * 16 + 16 + 1024
        );
        assert_eq!(
            TmaTile::N192.smem_bytes(),
            5 * 320 * 128 + 5 * 16 + 16 + 1024
        );
        assert_eq!(
            TmaTile::N256.smem_bytes(),
            4 * 384 * 128 + 4 * 16 + 16 + 1024
        );
        assert_eq!(
            TmaTile::PingPong128.smem_bytes(),
            TmaTile::N128.smem_bytes()
        );
        assert_eq!(TmaTile::M256N128.smem_bytes(), TmaTile::N256.smem_bytes());
        for (staged, twin) in [
            (TmaTile::StagedN128, TmaTile::N128),
            (TmaTile::StagedPingPong128, TmaTile::PingPong128),
            (TmaTile::StagedM256N128, TmaTile::M256N128),
            (TmaTile::StagedN192, TmaTile::N192),
        ] {
            // The staged epilogue stages in the ring: only two meeting barriers of its own.
            assert_eq!(staged.smem_bytes(), twin.smem_bytes() + 16);
            assert_eq!(staged.tiles(65_536, 3456), twin.tiles(65_536, 3456));
            assert!(staged.staged() && !twin.staged());
        }
        assert_eq!(TmaTile::M256N128.tiles(65_536, 3456), 256 * 27);
        assert_eq!(TmaTile::M256N128.tiles(300, 128), 2);
        for t in TmaTile::ALL {
            assert!(t.smem_bytes() <= 227 * 1024, "{t:?}");
            assert!(t.kernel_name().ends_with(&format!("x{}", t.bn())));
            assert_eq!(
                t.bench_name(),
                t.kernel_name()
                    .replace("gemm_tma_", "tma-")
                    .replace("pp_", "pp-")
                    .replace("st_", "st-")
                    .replace("mc_", "mc-")
                    .replace("c4x1_", "c4x1-")
                    .replace("c4x2_", "c4x2-")
                    .replace("-k2_", "-k2-")
                    .replace("-k3_", "-k3-")
                    .replace("-k4_", "-k4-"),
                "{t:?}"
            );
        }
        // fc2 of one image pair: 36 tiles of 128 x 128, K = 4608 = 72 k-tiles -> 3 slices (one
        // round of 24 k-tiles; 4 would be 144 units, two rounds of 18).
        assert_eq!(TmaTile::N128.pick_splits(512, 1152, 4608, 132, 8 << 20), 3);
        // proj (K = 1152 = 18 k-tiles): 2 slices of 9 would save less than the epilogue pass.
        assert_eq!(TmaTile::N128.pick_splits(512, 1152, 1152, 132, 8 << 20), 1);
        // A long K on few tiles: 4 x 2 tiles, 288 k-tiles -> 8 slices of 36.
        assert_eq!(TmaTile::N128.pick_splits(512, 256, 18_432, 132, 8 << 20), 8);
        // qkv (108 tiles, 18 k-tiles): splitting would need a second round.
        assert_eq!(TmaTile::N128.pick_splits(512, 3456, 1152, 132, 8 << 20), 1);
        // Too small a workspace: no split.
        assert_eq!(
            TmaTile::N128.pick_splits(512, 1152, 4608, 132, 512 * 1152),
            1
        );
        // Large M: no split.
        assert_eq!(
            TmaTile::N192.pick_splits(65_536, 1152, 4608, 132, 8 << 20),
            1
        );
    }

    #[test]
    fn tma_kernels_match_specs() {
        // The instantiations in gemm_sm90.cu: name, BM, BN, stages, cluster, staging and
        // cluster split-K as TmaTile::spec, TmaTile::bm, TmaTile::staged and
        // TmaTile::cluster_k say; 384 threads; clusters declared with __cluster_dims__
        // (FORA_CLUSTER(n)).
        let src = include_str!("../../kernels/gemm_sm90.cu");
        for t in TmaTile::ALL {
            let (name, bn, stages, pingpong, cm, cn) = t.spec();
            let at = src
                .find(&format!("{name}(const __grid_constant__ GemmTmaParams p)"))
                .unwrap_or_else(|| panic!("{name} is not instantiated"));
            let head = &src[src[..at].rfind("extern \"C\"").expect("a declaration")..at];
            assert!(head.contains("__launch_bounds__(384, 1)"), "{name}: {head}");
            assert_eq!(
                head.contains(&format!("FORA_CLUSTER({})", t.cluster())),
                t.cluster() > 1,
                "{name}: {head}"
            );
            // Its own body: the first FORA_TMA_BODY after the signature.
            let body = &src[at..];
            let first = body.find("FORA_TMA_BODY(").expect("a body");
            let bm = t.bm();
            let staged = match (t.staged(), t.cluster_k()) {
                (false, 1) => String::new(),
                (staged, 1) => format!(", {staged}"),
                (staged, ck) => format!(", {staged}, {ck}"),
            };
            let want =
                format!("FORA_TMA_BODY({bm}, {bn}, {stages}, {pingpong}, {cm}, {cn}{staged})");
            assert!(body[first..].starts_with(&want), "{name}: {want} expected");
        }
    }
}

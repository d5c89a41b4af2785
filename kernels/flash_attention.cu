// Flash attention over the paged KV cache on tensor cores: causal GQA,
// bf16 or fp16 in, fp32 softmax and accumulation, for prefill rows, decode
// rows and mixes of both in one launch.
//
// Rows are packed per KV head: sequence b's row R = i * G + g is query i of
// that sequence under query head kv_head * G + g (G = num_heads /
// num_kv_heads), so the G heads sharing a KV head share every K and V load.
//
// A block has 4 warps; each warp owns 16 packed rows and keeps everything of
// them in registers (FlashAttention-2 style): Q as mma A fragments, the
// 16 x BK scores, the running max and sum, and the 16 x D output. Scores
// come from mma.sync m16n8k16 with K read by ldmatrix; the probabilities are
// rounded to the storage type and reused in registers as the A operand of
// P V, with V read by ldmatrix.trans. K and V tiles go global -> shared
// memory by cp.async, 2 tiles deep (bench/flash_tile_sweep.py), rows padded
// to D + 8 elements so ldmatrix meets no bank conflict.
//
// KW (template) says how the 4 warps split the work:
// - KW = 1 (prefill): the warps own 64 rows of one sequence and share every
//   64-key tile;
// - KW = 4 (decode): the warps own the same 16 rows and take every 4th
//   16-key tile each, merging their partial softmax in shared memory at
//   the end.
// Across blocks, num_splits > 1 (grid.z) cuts each tile's key range into
// even runs of key tiles; each block writes its rows' (max, sum, weighted
// values) to `partial`, and the last of a tile's splits to finish (counted in
// `counters`, which it sets back to zero) merges them into `out`.
//
// Tiles are numbered over the sequences in order (sequence b has
// ceil(num_q_b * G / BQ)); the block finds its own with a block-wide scan of
// those counts, so the grid may be an upper bound and no host sync or
// host-built table is needed (graph-capturable). Blocks take the tiles last to
// first (longest first; flash_block_tile); blocks past the last tile exit. The grid
// has at least one such block, and block (0, 0, 0) zeroes the rows of out
// past query_start_loc[num_seqs] (padding), so no memset precedes the launch.
//
// Shapes: q [num_tokens, num_heads, D]; caches [num_blocks, block_size,
// num_kv_heads, D]; partial [num_tokens, num_heads, num_splits, D + 2]
// float32 when num_splits > 1; counters [gridDim.x * gridDim.y] int32, zero
// between launches. blockDim.x == 128. Dynamic shared memory:
// cuda_common.flash_smem_bytes.

// KW > 1: the key-warp groups hold the same 16 rows over different keys. Each writes its
// (max, sum, output rows) to shared memory (reusing the K/V stages); the block merges them
// (flash_combine_key_warps). Every thread of the block calls it.
template <typename T, int D, int KW>
__device__ void flash_merge_key_warps(unsigned char* smem, const float (&o)[D / 8][4], const float (&m)[2],
                                      const float (&l)[2], int rows_here, int row0, int group, int q_first,
                                      int num_heads, int kv_head, const FlashSink<T, D>& sink) {
    const int tid = threadIdx.x, lane = tid & 31, kw = (tid >> 5) / (FA_WARPS / KW), g = lane >> 2, t4 = lane & 3;
    __syncthreads();  // every group is done with its stages
    float* ms = reinterpret_cast<float*>(smem);  // [KW][16]
    float* ls = ms + KW * 16;                    // [KW][16]
    float* os = ls + KW * 16;                    // [KW][16][D]
    for (int i = 0; i < 2; ++i) {
        const int r = g + 8 * i;
        if (t4 == 0) {
            ms[kw * 16 + r] = m[i];
            ls[kw * 16 + r] = l[i];
        }
        for (int d = 0; d < D / 8; ++d) {
            os[(kw * 16 + r) * D + d * 8 + 2 * t4] = o[d][2 * i];
            os[(kw * 16 + r) * D + d * 8 + 2 * t4 + 1] = o[d][2 * i + 1];
        }
    }
    flash_combine_key_warps<T, D, KW, 16>(ms, ls, os, rows_here, row0, group, q_first, num_heads, kv_head, sink);
}

// One instantiation's tile shape (bench/flash_tile_sweep.py patches the BK and STAGES lines).
template <int D, int KW>
struct FaShape {
    static constexpr int RW = FA_WARPS / KW;      // warps over rows
    static constexpr int BQ = 16 * RW;            // packed rows per block
    static constexpr int BK = KW == 1 ? 64 : 16;  // keys per tile
    static constexpr int STAGES = KW == 1 ? 2 : 2;  // K/V tiles in flight: equal now, apart so bench.flash_tile_sweep can patch prefill's
    static constexpr int LD = D + 8;              // shared row stride, elements
    static constexpr int NT = BK / 8, DT = D / 8, VECS = D / 8;
    // Each thread copies 16 bytes of a row at a time: column lc of rows lr0, lr0 + STEP, ...
    // of a tile when the group's threads cover whole rows (D = 64, 128: everything but the
    // key's cache row is fixed a thread), else columns and rows computed a copy (D = 80).
    static constexpr int STEP = (RW * 32) % VECS == 0 ? RW * 32 / VECS : 0;
};

// The helpers split what was one kernel body without changing its machine code (scripts/sass-diff):
// nvcc optimises each alone before inlining it, so each must see its inputs as the body did.
// Computed values come by const reference, read into locals before any output is written (by
// value, or read after a store, they optimise differently); shared memory is addressed from the
// extern array, or from the loader's stages pointer where the body read that from memory.

struct FaRows {  // this thread's two rows: g and g + 8 of its warp's 16
    int pos[2];            // the row's query position: the last key it sees
    bool valid[2];         // a real row, not padding past the tile's last
    long long out_row[2];  // token * num_heads + head: where the row is in q and out
};
__device__ __forceinline__ FaRows fa_rows(const FlashRange& range, int wrow, int g, int group, int num_heads,
                                          int kv_head) {
    const int q_first = range.q_first, row0 = range.row0, rows_here = range.rows_here, first_pos = range.first_pos;
    FaRows w;
    for (int i = 0; i < 2; ++i) {
        const int r = wrow + g + 8 * i, packed = row0 + r;
        w.valid[i] = r < rows_here;
        w.pos[i] = first_pos + packed / group;
        w.out_row[i] = (long long)(q_first + packed / group) * num_heads + (long long)kv_head * group + packed % group;
    }
    return w;
}
// What the rows of one warp see: keys [k_lo, k_hi), a tile outside them skipped; busy: it has
// a real row. Tiles every row of the warp sees whole (full: all 16 rows valid; keys at or before
// its first row's position pos_lo and inside its last row's window) skip the per-element mask.
struct FaWarpKeys {
    bool busy, full;
    int k_lo, k_hi, pos_lo, pos_hi;  // pos_hi: the last row's position
};
__device__ __forceinline__ FaWarpKeys fa_warp_keys(const FlashRange& range, int rw, int group, int window) {
    const int wrow = rw * 16;  // here, not an argument: see above
    const int row0 = range.row0, rows_here = range.rows_here, first_pos = range.first_pos;
    FaWarpKeys k;
    k.busy = wrow < rows_here;
    const int warp_last = min(wrow + 15, rows_here - 1);
    k.k_hi = first_pos + (row0 + warp_last) / group + 1;
    k.k_lo = window > 0 ? max(0, first_pos + (row0 + wrow) / group - window + 1) : 0;
    k.full = wrow + 16 <= rows_here;
    k.pos_lo = first_pos + (row0 + wrow) / group;
    k.pos_hi = k.k_hi - 1;
    return k;
}

// The warp's Q rows as mma A fragments, zero for padding rows.
template <typename T, int D>
__device__ __forceinline__ void fa_load_q(unsigned (&qf)[D / 16][4], const T* q, const FaRows& w, int t4) {
    for (int kk = 0; kk < D / 16; ++kk)
        for (int ri = 0; ri < 4; ++ri) {
            const int i = ri & 1, col = kk * 16 + 2 * t4 + (ri >> 1) * 8;
            qf[kk][ri] = w.valid[i] ? *reinterpret_cast<const unsigned*>(q + w.out_row[i] * D + col) : 0u;
        }
}

// Copies key tiles, K and V, from the paged cache into the stages of this key-warp group's
// shared memory by cp.async; the caller commits and waits.
template <typename T, int D, int KW>
struct FaKvLoader {
    using S = FaShape<D, KW>;
    const FlashDivisor per_block;
    T* stages;  // this group's [STAGES][K|V][BK][LD]
    int gtid, lr0, lc;
    const char *k_base, *v_base;
    unsigned row_bytes, stage0;
    const int* table;
    int block_size, k_lo, k_hi;

    __device__ __forceinline__ FaKvLoader(const T* k_cache, const T* v_cache, const int* const& table_, int block_size_,
                                          const int& kv_head, const long long& kv_stride, const int& kw,
                                          const int& tid, const FlashRange& range)
        : per_block(block_size_) {
        extern __shared__ __align__(128) unsigned char smem[];
        T* const stages_ = reinterpret_cast<T*>(smem) + kw * (S::STAGES * 2 * S::BK * S::LD);
        const int gtid_ = tid - kw * S::RW * 32;
        const int lr0_ = S::STEP ? gtid_ / S::VECS : 0, lc_ = S::STEP ? (gtid_ % S::VECS) * 8 : 0;
        const char* k_base_ = reinterpret_cast<const char*>(k_cache + (long long)kv_head * D + lc_);
        const char* v_base_ = reinterpret_cast<const char*>(v_cache + (long long)kv_head * D + lc_);
        const unsigned row_bytes_ = (unsigned)kv_stride * sizeof(T);
        const unsigned stage0_ = smem_u32(stages_ + lr0_ * S::LD + lc_);
        stages = stages_, gtid = gtid_, lr0 = lr0_, lc = lc_, k_base = k_base_, v_base = v_base_, row_bytes = row_bytes_;
        stage0 = stage0_, table = table_, block_size = block_size_, k_lo = range.k_lo, k_hi = range.k_hi;
    }

    __device__ __forceinline__ unsigned long long cache_bytes(int j) const {  // where key j's row starts, in bytes
        const int blk = per_block.div(j);
        return (unsigned long long)(unsigned)(__ldg(table + blk) * block_size + (j - blk * block_size)) * row_bytes;
    }

    __device__ __forceinline__ void load(int t, int stage) const {  // key tile t into stage `stage`
        constexpr int BK = S::BK, LD = S::LD, STEP = S::STEP, VECS = S::VECS;
        const int kb = k_lo + t * BK;
        if constexpr (STEP > 0) {
            const unsigned ks = stage0 + stage * 2 * BK * LD * sizeof(T), vs = ks + BK * LD * sizeof(T);
#pragma unroll
            for (int k = 0; k < BK / STEP; ++k) {
                const int j = kb + lr0 + k * STEP;
                const bool ok = j < k_hi;
                const unsigned long long off = ok ? cache_bytes(j) : 0;
                cp_async16_at(ks + k * STEP * LD * sizeof(T), k_base + off, ok);
                cp_async16_at(vs + k * STEP * LD * sizeof(T), v_base + off, ok);
            }
        } else {
            T* ks = stages + stage * 2 * BK * LD;
            T* vs = ks + BK * LD;
            for (int i = gtid; i < BK * VECS; i += S::RW * 32) {
                const int r = i / VECS, c = (i % VECS) * 8, j = kb + r;
                const bool ok = j < k_hi;
                const unsigned long long off = ok ? cache_bytes(j) + c * sizeof(T) : 0;
                cp_async16(ks + r * LD + c, k_base + off, ok);
                cp_async16(vs + r * LD + c, v_base + off, ok);
            }
        }
    }
};

// Raw scores of the key tile in stage `stage`: s[n] holds keys n * 8 .. n * 8 + 7. mi, mr:
// which 8x8 matrix and which row of it this lane addresses for ldmatrix.
template <typename T, int D, int KW>
__device__ __forceinline__ void fa_scores(float (&s)[FaShape<D, KW>::NT][4], const unsigned (&qf)[D / 16][4],
                                          T* const& stages, const int& kw, const int& stage, const int& mi,
                                          const int& mr) {
    using S = FaShape<D, KW>;
    constexpr int BK = S::BK, LD = S::LD, STAGES = S::STAGES;
    extern __shared__ __align__(128) unsigned char smem[];
    const T* ks;  // the same address both ways; the body kept stages in memory only for STEP = 0
    if constexpr (S::STEP > 0) ks = reinterpret_cast<T*>(smem) + kw * (STAGES * 2 * BK * LD) + stage * 2 * BK * LD;
    else ks = stages + stage * 2 * BK * LD;
    const T* tag = nullptr;  // picks the mma overload
    for (int n = 0; n < S::NT; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
        for (int np = 0; np < S::NT / 2; ++np) {
            unsigned kf[4];  // keys (2np + mi/2) * 8 + mr, dims kk * 16 + (mi % 2) * 8
            ldmatrix_x4(kf, ks + ((2 * np + (mi >> 1)) * 8 + mr) * LD + kk * 16 + (mi & 1) * 8);
            mma16816(s[2 * np], qf[kk], kf[0], kf[1], tag);
            mma16816(s[2 * np + 1], qf[kk], kf[2], kf[3], tag);
        }
}

// Each row's max raw score over the tile, reduced over the 4 lanes holding the row, after
// setting the scores of keys the row must not see to -inf.
template <int NT>
__device__ __forceinline__ void fa_mask_max(float (&s)[NT][4], float (&mx)[2], const FaRows& w, const FaWarpKeys& wk,
                                            const int& kb_, const int& k_hi_, int window, const int& t4_) {
    constexpr int BK = NT * 8;
    const int kb = kb_, k_hi = k_hi_, t4 = t4_;
    const bool valid[2] = {w.valid[0], w.valid[1]};
    const int pos[2] = {w.pos[0], w.pos[1]};
    const bool warp_full = wk.full;
    const int warp_pos_lo = wk.pos_lo, warp_pos_hi = wk.pos_hi;
    mx[0] = mx[1] = -SHARDLINE_INF;
    const bool unmasked = warp_full && kb + BK <= k_hi && kb + BK - 1 <= warp_pos_lo
                          && (window <= 0 || kb > warp_pos_hi - window);
    if (unmasked) {   // most tiles: no per-element test
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) mx[e >> 1] = fmaxf(mx[e >> 1], s[n][e]);
    } else {
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int i = e >> 1, j = kb + n * 8 + 2 * t4 + (e & 1);
                const bool seen = valid[i] && j < k_hi && j <= pos[i] && (window <= 0 || j > pos[i] - window);
                s[n][e] = seen ? s[n][e] : -SHARDLINE_INF;
                mx[i] = fmaxf(mx[i], s[n][e]);
            }
    }
    for (int i = 0; i < 2; ++i) {   // a row's scores are spread over the 4 lanes of one g
        mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
        mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
    }
}

// o += P V for the tile in stage `stage`: the probabilities in s, rounded to the storage type,
// are the mma A operand straight from registers; V comes by ldmatrix.trans.
template <typename T, int D, int KW>
__device__ __forceinline__ void fa_accumulate_pv(float (&o)[D / 8][4], const float (&s)[FaShape<D, KW>::NT][4],
                                                 T* const& stages, const int& kw, const int& stage,
                                                 const int& mi, const int& mr) {
    using S = FaShape<D, KW>;
    constexpr int BK = S::BK, LD = S::LD, STAGES = S::STAGES;
    extern __shared__ __align__(128) unsigned char smem[];
    const T* ks;  // as in fa_scores
    if constexpr (S::STEP > 0) ks = reinterpret_cast<T*>(smem) + kw * (STAGES * 2 * BK * LD) + stage * 2 * BK * LD;
    else ks = stages + stage * 2 * BK * LD;
    const T* vs = ks + BK * LD;
    const T* tag = nullptr;  // picks the mma and pack overloads
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
        const unsigned pa[4] = {pack2(s[2 * kk][0], s[2 * kk][1], tag), pack2(s[2 * kk][2], s[2 * kk][3], tag),
                                pack2(s[2 * kk + 1][0], s[2 * kk + 1][1], tag),
                                pack2(s[2 * kk + 1][2], s[2 * kk + 1][3], tag)};
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
            unsigned vf[4];  // keys kk * 16 + (mi % 2) * 8 + mr, dims dp * 16 + (mi / 2) * 8
            ldmatrix_x4_trans(vf, vs + (kk * 16 + (mi & 1) * 8 + mr) * LD + dp * 16 + (mi >> 1) * 8);
            mma16816(o[2 * dp], pa, vf[0], vf[1], tag);
            mma16816(o[2 * dp + 1], pa, vf[2], vf[3], tag);
        }
    }
}

// The group's key tiles of this split, every KW-th from t_begin + kw, through its shared-memory
// stages: scores, mask, online softmax, P V. Leaves o, m and l final, l summed over the row.
template <typename T, int D, int KW>
__device__ __forceinline__ void fa_key_loop(float (&o)[D / 8][4], float (&m)[2], float (&l)[2],
                                            const FaKvLoader<T, D, KW>& kv, const unsigned (&qf)[D / 16][4],
                                            const FaRows& w, const FaWarpKeys& wk, const FlashRange& range,
                                            const int& kw_, const int& lane_, const int& t4_, int window,
                                            const float& scale2_) {
    using S = FaShape<D, KW>;
    constexpr int BK = S::BK, STAGES = S::STAGES;
    const int kw = kw_, lane = lane_, t4 = t4_;
    const int k_lo = range.k_lo, k_hi = range.k_hi, t_begin = range.t_begin, t_end = range.t_end;
    const bool warp_busy = wk.busy;
    const int warp_k_lo = wk.k_lo, warp_k_hi = wk.k_hi;
    const float scale2 = scale2_;
    auto group_sync = [&]() {
        if (S::RW == 1) __syncwarp();
        else asm volatile("bar.sync %0, %1;\n" ::"r"(kw + 1), "n"(S::RW * 32));
    };
    const int mi = lane >> 3, mr = lane & 7;
    // One commit group per tile slot, empty past the last tile, so that waiting for all but
    // the newest STAGES - 1 groups always means: this iteration's tile has landed.
    int t = t_begin + kw;
#pragma unroll
    for (int st = 0; st < STAGES - 1; ++st) {
        if (t + st * KW < t_end) kv.load(t + st * KW, st);
        asm volatile("cp.async.commit_group;\n" ::);
    }
    for (int it = 0; t < t_end; ++it, t += KW) {
        if (t + (STAGES - 1) * KW < t_end) kv.load(t + (STAGES - 1) * KW, (it + STAGES - 1) % STAGES);
        asm volatile("cp.async.commit_group;\n" ::);
        asm volatile("cp.async.wait_group %0;\n" ::"n"(STAGES - 1));
        group_sync();
        const int kb = k_lo + t * BK;
        if (warp_busy && kb < warp_k_hi && kb + BK > warp_k_lo) {
            const int stage = it % STAGES;
            float s[S::NT][4], mx[2];
            fa_scores<T, D, KW>(s, qf, kv.stages, kw, stage, mi, mr);
            fa_mask_max(s, mx, w, wk, kb, k_hi, window, t4);
            flash_softmax_update<1>(s, o, m, l, mx, scale2);
            fa_accumulate_pv<T, D, KW>(o, s, kv.stages, kw, stage, mi, mr);
        }
        group_sync();  // the stage is free for the load STAGES - 1 tiles on
    }
    asm volatile("cp.async.wait_group 0;\n" ::);   // no copy in flight into shared memory reused below
    flash_row_sums(l);
}

// KW = 1: each warp's rows are its own, so each lane writes its columns of its two rows.
template <typename T, int D>
__device__ __forceinline__ void fa_write_rows(const FlashSink<T, D>& sink, const FaRows& w, const float (&o)[D / 8][4],
                                              const float (&m)[2], const float (&l)[2], int t4) {
    for (int i = 0; i < 2; ++i) {
        if (!w.valid[i]) continue;
        for (int d = 0; d < D / 8; ++d) sink.put2(w.out_row[i], d * 8 + 2 * t4, o[d][2 * i], o[d][2 * i + 1], l[i]);
        if (t4 == 0) sink.put_stats(w.out_row[i], m[i], l[i]);
    }
}

template <typename T, int D, int KW>
__global__ void __launch_bounds__(FA_THREADS)
    flash_attention_kernel(FLASH_PAGED_PARAMS) {
    pdl_begin();
    using S = FaShape<D, KW>;
    extern __shared__ __align__(128) unsigned char smem[];

    const int group = num_heads / num_kv_heads;
    // Longest tiles first, short ones fill the tail (causal prefill; flash_block_tile)
    const FlashBlock at = flash_block_start<T, D>(heads_first, query_start_loc, num_seqs, group, S::BQ, out, num_tokens,
                                                  num_heads);
    if (at.b < 0) return;   // the same for every thread of the block
    const int b = at.b, split = blockIdx.z, target = at.target, kv_head = at.kv_head;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, rw = warp % S::RW, kw = warp / S::RW;
    const int g = lane >> 2, t4 = lane & 3;
    const FlashRange range = flash_range(query_start_loc, seq_lens, b, at.tile, S::BQ, S::BK, group, window, split,
                                         num_splits);
    const int* table = block_tables + (long long)b * max_blocks;
    const long long kv_stride = (long long)num_kv_heads * D;

    const FaRows w = fa_rows(range, rw * 16, g, group, num_heads, kv_head);
    const FaWarpKeys wk = fa_warp_keys(range, rw, group, window);
    unsigned qf[D / 16][4];
    fa_load_q<T, D>(qf, q, w, t4);

    float o[S::DT][4];
    for (int d = 0; d < S::DT; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.0f;
    float m[2] = {-SHARDLINE_INF, -SHARDLINE_INF}, l[2] = {0.0f, 0.0f};
    const float scale2 = scale * FA_LOG2E;  // to log2 units, in flash_softmax_update (scale > 0)
    const FaKvLoader<T, D, KW> kv(k_cache, v_cache, table, block_size, kv_head, kv_stride, kw, tid, range);
    fa_key_loop<T, D, KW>(o, m, l, kv, qf, w, wk, range, kw, lane, t4, window, scale2);

    const FlashSink<T, D> sink = {out, partial, num_heads, num_splits, split, num_splits};
    if (KW == 1)
        fa_write_rows<T, D>(sink, w, o, m, l, t4);
    else
        flash_merge_key_warps<T, D, KW>(smem, o, m, l, range.rows_here, range.row0, group, range.q_first, num_heads,
                                        kv_head, sink);
    if (num_splits > 1)
        flash_merge_splits<T, D>(partial, out, counters + (long long)target * gridDim.y + kv_head, num_splits,
                                 num_splits, range.rows_here, range.row0, group, range.q_first, num_heads, kv_head);
}

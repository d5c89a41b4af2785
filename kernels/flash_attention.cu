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
// host-built table is needed (graph-capturable). Block x takes tile
// gridDim.x - 1 - x (longest first); blocks past the last tile exit. The grid
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

template <typename T, int D, int KW>
__global__ void __launch_bounds__(FA_THREADS)
    flash_attention_kernel(const T* q, const T* k_cache, const T* v_cache, T* out, float* partial,
                           const int* block_tables, int max_blocks, int block_size, const int* seq_lens,
                           const int* query_start_loc, int num_seqs, int num_heads, int num_kv_heads, float scale,
                           int window, int num_splits, int* counters, int num_tokens) {
    pdl_begin();
    constexpr int RW = FA_WARPS / KW;      // warps over rows
    constexpr int BQ = 16 * RW;            // packed rows per block
    constexpr int BK = KW == 1 ? 64 : 16;  // keys per tile
    constexpr int STAGES = KW == 1 ? 2 : 2;  // K/V tiles in flight: equal now, apart so bench.flash_tile_sweep can patch prefill's
    constexpr int LD = D + 8;              // shared row stride, elements
    constexpr int NT = BK / 8, DT = D / 8, VECS = D / 8;
    extern __shared__ __align__(128) unsigned char smem[];

    const int group = num_heads / num_kv_heads;
    // Blocks take the tiles last to first: a sequence's last tiles see the most keys, so the
    // longest blocks start in the first wave and short ones fill the tail (causal prefill).
    const int target = gridDim.x - 1 - blockIdx.x;
    const int2 where = flash_find_tile(query_start_loc, num_seqs, group, BQ, target);
    if (where.x < 0) {  // the same for every thread of the block
        if (blockIdx.x == 0 && blockIdx.y == 0 && blockIdx.z == 0)   // past the last tile
            flash_zero_padding<T, D>(out, query_start_loc, num_seqs, num_tokens, num_heads);
        return;
    }
    const int b = where.x, kv_head = blockIdx.y, split = blockIdx.z;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, rw = warp % RW, kw = warp / RW;
    const int g = lane >> 2, t4 = lane & 3;
    const FlashRange range = flash_range(query_start_loc, seq_lens, b, where.y, BQ, BK, group, window, split,
                                         num_splits);
    const int q_first = range.q_first, row0 = range.row0, rows_here = range.rows_here;
    const int first_pos = range.first_pos, k_lo = range.k_lo, k_hi = range.k_hi;
    const int t_begin = range.t_begin, t_end = range.t_end;
    const int* table = block_tables + (long long)b * max_blocks;
    const long long kv_stride = (long long)num_kv_heads * D;
    const T* tag = nullptr;  // picks the mma and pack overloads

    // This thread's two rows (g and g + 8 of the warp's 16) and what they see.
    const int wrow = rw * 16;
    const bool warp_busy = wrow < rows_here;
    int pos[2];
    bool valid[2];
    long long out_row[2];
    for (int i = 0; i < 2; ++i) {
        const int r = wrow + g + 8 * i, packed = row0 + r;
        valid[i] = r < rows_here;
        pos[i] = first_pos + packed / group;
        out_row[i] = (long long)(q_first + packed / group) * num_heads + (long long)kv_head * group + packed % group;
    }
    const int warp_last = min(wrow + 15, rows_here - 1);
    const int warp_k_hi = first_pos + (row0 + warp_last) / group + 1;
    const int warp_k_lo = window > 0 ? max(0, first_pos + (row0 + wrow) / group - window + 1) : 0;
    // Tiles every row of the warp sees whole (all 16 rows valid, keys at or before its first
    // row's position and inside its last row's window) skip the per-element mask.
    const bool warp_full = wrow + 16 <= rows_here;
    const int warp_pos_lo = first_pos + (row0 + wrow) / group, warp_pos_hi = warp_k_hi - 1;

    unsigned qf[D / 16][4];
    for (int kk = 0; kk < D / 16; ++kk)
        for (int ri = 0; ri < 4; ++ri) {
            const int i = ri & 1, col = kk * 16 + 2 * t4 + (ri >> 1) * 8;
            qf[kk][ri] = valid[i] ? *reinterpret_cast<const unsigned*>(q + out_row[i] * D + col) : 0u;
        }

    float o[DT][4];
    for (int d = 0; d < DT; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.0f;
    float m[2] = {-SHARDLINE_INF, -SHARDLINE_INF}, l[2] = {0.0f, 0.0f};
    const float scale2 = scale * FA_LOG2E;  // to log2 units, in flash_softmax_update (scale > 0)
    const FlashDivisor per_block(block_size);

    T* stages = reinterpret_cast<T*>(smem) + kw * (STAGES * 2 * BK * LD);  // this group's [STAGES][K|V][BK][LD]
    const int gtid = tid - kw * RW * 32;
    // Each thread copies 16 bytes of a row at a time: column lc of rows lr0, lr0 + STEP, ...
    // of a tile when the group's threads cover whole rows (D = 64, 128: everything but the
    // key's cache row is fixed a thread), else columns and rows computed a copy (D = 80).
    constexpr int STEP = (RW * 32) % VECS == 0 ? RW * 32 / VECS : 0;
    const int lr0 = STEP ? gtid / VECS : 0, lc = STEP ? (gtid % VECS) * 8 : 0;
    const char* k_base = reinterpret_cast<const char*>(k_cache + (long long)kv_head * D + lc);
    const char* v_base = reinterpret_cast<const char*>(v_cache + (long long)kv_head * D + lc);
    const unsigned row_bytes = (unsigned)kv_stride * sizeof(T);
    auto cache_bytes = [&](int j) {   // where key j's row starts in the cache, in bytes
        const int blk = per_block.div(j);
        return (unsigned long long)(unsigned)(__ldg(table + blk) * block_size + (j - blk * block_size)) * row_bytes;
    };
    const unsigned stage0 = smem_u32(stages + lr0 * LD + lc);
    auto load = [&](int t, int stage) {
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
            for (int i = gtid; i < BK * VECS; i += RW * 32) {
                const int r = i / VECS, c = (i % VECS) * 8, j = kb + r;
                const bool ok = j < k_hi;
                const unsigned long long off = ok ? cache_bytes(j) + c * sizeof(T) : 0;
                cp_async16(ks + r * LD + c, k_base + off, ok);
                cp_async16(vs + r * LD + c, v_base + off, ok);
            }
        }
    };
    auto group_sync = [&]() {
        if (RW == 1) __syncwarp();
        else asm volatile("bar.sync %0, %1;\n" ::"r"(kw + 1), "n"(RW * 32));
    };

    const int mi = lane >> 3, mr = lane & 7;  // ldmatrix: which 8x8 matrix and row this lane addresses
    // One commit group per tile slot, empty past the last tile, so that waiting for all but
    // the newest STAGES - 1 groups always means: this iteration's tile has landed.
    int t = t_begin + kw;
#pragma unroll
    for (int st = 0; st < STAGES - 1; ++st) {
        if (t + st * KW < t_end) load(t + st * KW, st);
        asm volatile("cp.async.commit_group;\n" ::);
    }
    for (int it = 0; t < t_end; ++it, t += KW) {
        if (t + (STAGES - 1) * KW < t_end) load(t + (STAGES - 1) * KW, (it + STAGES - 1) % STAGES);
        asm volatile("cp.async.commit_group;\n" ::);
        asm volatile("cp.async.wait_group %0;\n" ::"n"(STAGES - 1));
        group_sync();
        const int kb = k_lo + t * BK;
        if (warp_busy && kb < warp_k_hi && kb + BK > warp_k_lo) {
            const T* ks = stages + (it % STAGES) * 2 * BK * LD;
            const T* vs = ks + BK * LD;
            float s[NT][4];
            for (int n = 0; n < NT; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
                for (int np = 0; np < NT / 2; ++np) {
                    unsigned kf[4];  // keys (2np + mi/2) * 8 + mr, dims kk * 16 + (mi % 2) * 8
                    ldmatrix_x4(kf, ks + ((2 * np + (mi >> 1)) * 8 + mr) * LD + kk * 16 + (mi & 1) * 8);
                    mma16816(s[2 * np], qf[kk], kf[0], kf[1], tag);
                    mma16816(s[2 * np + 1], qf[kk], kf[2], kf[3], tag);
                }
            float mx[2] = {-SHARDLINE_INF, -SHARDLINE_INF};   // the tile's max raw score a row
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
            flash_softmax_update<1>(s, o, m, l, mx, scale2);
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
        group_sync();  // the stage is free for the load STAGES - 1 tiles on
    }
    asm volatile("cp.async.wait_group 0;\n" ::);   // no copy in flight into shared memory reused below
    for (int i = 0; i < 2; ++i) {  // each of the 4 lanes of a row summed its own columns
        l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
        l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
    }

    const FlashSink<T, D> sink = {out, partial, num_heads, num_splits, split, num_splits};
    if (KW == 1) {  // each warp's rows are its own
        for (int i = 0; i < 2; ++i) {
            if (!valid[i]) continue;
            for (int d = 0; d < DT; ++d) sink.put2(out_row[i], d * 8 + 2 * t4, o[d][2 * i], o[d][2 * i + 1], l[i]);
            if (t4 == 0) sink.put_stats(out_row[i], m[i], l[i]);
        }
    } else {
        flash_merge_key_warps<T, D, KW>(smem, o, m, l, rows_here, row0, group, q_first, num_heads, kv_head, sink);
    }
    if (num_splits > 1)
        flash_merge_splits<T, D>(partial, out, counters + (long long)target * gridDim.y + kv_head, num_splits,
                                 num_splits, rows_here, row0, group, q_first, num_heads, kv_head);
}

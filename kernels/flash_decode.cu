// Flash attention for decode rows on tensor cores, with the keys as the mma's
// M dimension: S^T = K Q^T, then O^T += V^T P^T. Same arguments, row packing,
// tile lookup, splits and sinks as flash_attention.cu (flash_common.cu holds
// the shared pieces); launched when the rows average at most 8 a sequence
// (a decode step: one query token under the G heads of a KV head).
//
// A block owns one tile of 8 packed rows of one sequence and KV head. Its KW
// warps take every KW-th tile of BK keys each, from their own STAGES cp.async
// stages, and merge their partial softmax in shared memory at the end. Fewer
// warps a block need less shared memory (KW * STAGES * 8.5 KiB at D = 128), so
// more blocks fit an SM: a batch's blocks may then run in one wave. With the rows
// as the mma's N = 8, a warp keeps Q as B fragments (D / 8 registers) and its
// output as O^T, D / 16 fragments of 4 floats (32 registers at D = 128), where
// flash_attention.cu's decode shape pads 4 rows to 16 and keeps 64: about half
// the registers, so twice the blocks fit an SM and more keys are in flight.
// The probabilities leave the scores' accumulator (keys as rows) as bf16/fp16
// and become the B operand of V^T P^T (keys as columns) by movmatrix.

// The helpers below split what was one kernel body without changing its machine code
// (scripts/sass-diff flash_decode), as in flash_attention.cu: nvcc optimises each alone before
// inlining it, so each must see its inputs as the body did. Values the kernel computed come by
// const reference and are read into locals before any output is written; shared memory is
// addressed from the extern array, or from the loader's stages where the body read that from
// memory. Where a value is computed matters too: the loader computes stage0 after its other
// members (else nvcc rematerialises it and k_base in the key loop in another order), the kernel
// computes mi and mr, and the rows' positions come from fd_rows, not a struct the kernel fills.

// This lane's rows, 2 t4 and 2 t4 + 1 (the mma's columns): pos, their query positions (the last
// key each sees); pos_lo and pos_hi, the block's first and last rows' positions. Rows past
// rows_here compute on zero queries and are never written.
struct FdRows {
    int pos[2], pos_lo, pos_hi;
};
__device__ __forceinline__ FdRows fd_rows(const FlashRange& range, int t4, int group) {
    const int row0 = range.row0, first_pos = range.first_pos, k_hi = range.k_hi;
    FdRows w;
    for (int i = 0; i < 2; ++i) w.pos[i] = first_pos + (row0 + 2 * t4 + i) / group;
    w.pos_lo = first_pos + row0 / group, w.pos_hi = k_hi - 1;
    return w;
}

// Q as the B operand (dims x rows): row g, dims 2 t4 (+1) and 2 t4 + 8 (+1) of each 16; zero past
// rows_here.
template <typename T, int D>
__device__ __forceinline__ void fd_load_q(unsigned (&qf)[D / 16][2], const T* q, const FlashRange& range,
                                          const int& g_, const int& t4_, const int& group_, int num_heads,
                                          int kv_head) {
    const int g = g_, t4 = t4_, group = group_;
    const int q_first = range.q_first, row0 = range.row0, rows_here = range.rows_here;
    const int q_packed = row0 + g;
    const long long q_row = (long long)(q_first + q_packed / group) * num_heads + (long long)kv_head * group
                            + q_packed % group;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
        for (int h = 0; h < 2; ++h)
            qf[kk][h] = g < rows_here ? *reinterpret_cast<const unsigned*>(q + q_row * D + kk * 16 + 8 * h + 2 * t4)
                                      : 0u;
}

// S^T = K Q^T, the raw scores of the key tile in stage `stage`: s[mt][e] is key mt * 16 + g + 8 (e / 2),
// row 2 t4 + e % 2. mi, mr: which 8x8 matrix and which row of it this lane addresses for ldmatrix.
template <typename T, int D, int BK, int STAGES>
__device__ __forceinline__ void fd_scores(float (&s)[BK / 16][4], const unsigned (&qf)[D / 16][2],
                                          const FdKvLoader<T, D, BK, STAGES>& kv, const int& kw, const int& stage,
                                          const int& mi, const int& mr) {
    constexpr int LD = D + 8;
    extern __shared__ __align__(128) unsigned char smem[];
    const T* ks;  // the same address both ways; the body kept stages in memory only for STEP = 0
    if constexpr (FdKvLoader<T, D, BK, STAGES>::STEP > 0)
        ks = reinterpret_cast<T*>(smem) + kw * (STAGES * 2 * BK * LD) + stage * 2 * BK * LD;
    else
        ks = kv.stages + stage * 2 * BK * LD;
    const T* tag = nullptr;  // picks the mma overload
#pragma unroll
    for (int mt = 0; mt < BK / 16; ++mt) s[mt][0] = s[mt][1] = s[mt][2] = s[mt][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
        for (int mt = 0; mt < BK / 16; ++mt) {
            unsigned kf[4];  // keys mt * 16 + (mi % 2) * 8 + mr, dims kk * 16 + (mi / 2) * 8
            ldmatrix_x4(kf, ks + (mt * 16 + (mi & 1) * 8 + mr) * LD + kk * 16 + (mi >> 1) * 8);
            mma16816(s[mt], kf, qf[kk][0], qf[kk][1], tag);
        }
}

// Each row's max raw score over the tile of keys from kb, reduced over the 8 lanes holding the
// row, after setting the scores of keys the row must not see to -inf. A tile whose keys all exist
// and are seen by every row (at or before the first row's position, inside the last row's window)
// skips the per-key test.
template <int MT>
__device__ __forceinline__ void fd_mask_max(float (&s)[MT][4], float (&mx)[2], const FdRows& w, const int& kb_,
                                            const int& k_hi_, int window, const int& g_) {
    constexpr int BK = MT * 16;
    const int kb = kb_, k_hi = k_hi_, g = g_;
    const int pos[2] = {w.pos[0], w.pos[1]};
    const int pos_lo = w.pos_lo, pos_hi = w.pos_hi;
    const bool unmasked = kb + BK <= k_hi && kb + BK - 1 <= pos_lo && (window <= 0 || kb > pos_hi - window);
    mx[0] = mx[1] = -SHARDLINE_INF;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int i = e & 1, j = kb + mt * 16 + g + 8 * (e >> 1);
            const bool seen = unmasked || (j < k_hi && j <= pos[i] && (window <= 0 || j > pos[i] - window));
            s[mt][e] = seen ? s[mt][e] : -SHARDLINE_INF;
            mx[i] = fmaxf(mx[i], s[mt][e]);
        }
    for (int i = 0; i < 2; ++i)   // a row's keys are spread over the 8 lanes of one t4
        for (int offset = 4; offset < 32; offset <<= 1)
            mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], offset));
}

// O^T += V^T P^T for the tile in stage `stage`: the probabilities leave s (keys as rows) as the
// storage type and become the B operand (keys as columns) by movmatrix; V^T comes by ldmatrix.trans.
template <typename T, int D, int BK, int STAGES>
__device__ __forceinline__ void fd_accumulate_pv(float (&o)[D / 16][4], const float (&s)[BK / 16][4],
                                                 const FdKvLoader<T, D, BK, STAGES>& kv, const int& kw,
                                                 const int& stage, const int& mi, const int& mr) {
    constexpr int LD = D + 8;
    extern __shared__ __align__(128) unsigned char smem[];
    const T* ks;  // as in fd_scores
    if constexpr (FdKvLoader<T, D, BK, STAGES>::STEP > 0)
        ks = reinterpret_cast<T*>(smem) + kw * (STAGES * 2 * BK * LD) + stage * 2 * BK * LD;
    else
        ks = kv.stages + stage * 2 * BK * LD;
    const T* vs = ks + BK * LD;
    const T* tag = nullptr;  // picks the mma and pack overloads
#pragma unroll
    for (int mt = 0; mt < BK / 16; ++mt) {
        // P^T as B (keys x rows): the transposes of the two 8 x 8 (key, row) halves.
        const unsigned b0 = movmatrix_trans(pack2(s[mt][0], s[mt][1], tag));
        const unsigned b1 = movmatrix_trans(pack2(s[mt][2], s[mt][3], tag));
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
            unsigned vf[4];  // V^T as A: matrix mi is dims dp * 16 + (mi % 2) * 8, keys mt * 16 + (mi / 2) * 8
            ldmatrix_x4_trans(vf, vs + (mt * 16 + (mi >> 1) * 8 + mr) * LD + dp * 16 + (mi & 1) * 8);
            mma16816(o[dp], vf, b0, b1, tag);
        }
    }
}

// The warp's key tiles of this split, every KW-th from t, the first STAGES - 1 of them on their
// way (fd_prologue; ahead: the next tile's cache rows): scores, mask, online softmax, P V, one
// tile a stage. Leaves o, m and l final, l summed over the row.
template <typename T, int D, int BK, int STAGES, int KW>
__device__ __forceinline__ void fd_key_loop(float (&o)[D / 16][4], float (&m)[2], float (&l)[2],
                                            const FdKvLoader<T, D, BK, STAGES>& kv, const unsigned (&qf)[D / 16][2],
                                            const FdRows& w, const FlashRange& range, const int& t_,
                                            const int& ahead_, const int& kw_, const int& g_, const int& mi_,
                                            const int& mr_, int window, const float& scale2_) {
    const int kw = kw_, g = g_, mi = mi_, mr = mr_, k_lo = range.k_lo, k_hi = range.k_hi, t_end = range.t_end;
    const float scale2 = scale2_;
    int t = t_, ahead = ahead_;
    for (int it = 0; t < t_end; ++it, t += KW) {
        if (t + (STAGES - 1) * KW < t_end) kv.load(t + (STAGES - 1) * KW, (it + STAGES - 1) % STAGES, ahead);
        asm volatile("cp.async.commit_group;\n" ::);
        ahead = kv.cache_row(t + STAGES * KW);
        asm volatile("cp.async.wait_group %0;\n" ::"n"(STAGES - 1));
        __syncwarp();
        const int kb = k_lo + t * BK, stage = it % STAGES;
        float s[BK / 16][4], mx[2];
        fd_scores(s, qf, kv, kw, stage, mi, mr);
        fd_mask_max(s, mx, w, kb, k_hi, window, g);
        flash_softmax_update<0>(s, o, m, l, mx, scale2);
        fd_accumulate_pv(o, s, kv, kw, stage, mi, mr);
        __syncwarp();  // the stage is free for the load STAGES - 1 tiles on
    }
    asm volatile("cp.async.wait_group 0;\n" ::);   // no copy in flight into shared memory reused below
    for (int i = 0; i < 2; ++i)   // each of the 8 lanes of a row summed its own keys
        for (int offset = 4; offset < 32; offset <<= 1) l[i] += __shfl_xor_sync(0xffffffffu, l[i], offset);
}

// The block's KW key warps hold the same BQ rows over different keys: each writes its rows'
// (max, sum, outputs) to shared memory over its stages, and the block merges them
// (flash_combine_key_warps). Every thread of the block calls it.
template <typename T, int D, int KW, int BQ>
__device__ __forceinline__ void fd_merge_key_warps(const float (&o)[D / 16][4], const float (&m)[2],
                                                   const float (&l)[2], const FlashRange& range, const int& kw_,
                                                   const int& g_, const int& t4_, int group, int num_heads,
                                                   int kv_head, const FlashSink<T, D>& sink) {
    extern __shared__ __align__(128) unsigned char smem[];
    const int kw = kw_, g = g_, t4 = t4_;
    __syncthreads();  // every warp is done with its stages
    float* ms = reinterpret_cast<float*>(smem);  // [KW][BQ]
    float* ls = ms + KW * BQ;                    // [KW][BQ]
    float* os = ls + KW * BQ;                    // [KW][BQ][D]
    for (int i = 0; i < 2; ++i) {
        const int r = kw * BQ + 2 * t4 + i;
        if (g == 0) {
            ms[r] = m[i];
            ls[r] = l[i];
        }
#pragma unroll
        for (int d = 0; d < D / 16; ++d) {
            os[r * D + d * 16 + g] = o[d][i];
            os[r * D + d * 16 + g + 8] = o[d][2 + i];
        }
    }
    flash_combine_key_warps<T, D, KW, BQ>(ms, ls, os, range.rows_here, range.row0, group, range.q_first, num_heads,
                                          kv_head, sink);
}

// A block past the last tile: it waits for the kernel before, and block (0, 0, 0) zeroes the rows
// past the last sequence.
template <typename T, int D>
__device__ __forceinline__ void fd_past_the_last_tile(T* out, const int* query_start_loc, int num_seqs,
                                                      int num_tokens, int num_heads) {
    pdl_begin();
    if (blockIdx.x == 0 && blockIdx.y == 0 && blockIdx.z == 0)
        flash_zero_padding<T, D>(out, query_start_loc, num_seqs, num_tokens, num_heads);
    FLASH_TRACE_VALUE(9, flash_globaltimer());
}

template <typename T, int D, int BK, int STAGES, int KW>
__global__ void __launch_bounds__(KW * 32, 20 / KW)   // 96-126 registers at D = 128, no spill
    flash_decode_kernel(const T* q, const T* k_cache, const T* v_cache, T* out, float* partial,
                        const int* block_tables, int max_blocks, int block_size, const int* seq_lens,
                        const int* query_start_loc, int num_seqs, int num_heads, int num_kv_heads, float scale,
                        int window, int num_splits, int* counters, int num_tokens, int min_split_tiles,
                        int one_query, int table_ahead) {
    constexpr int BQ = 8, DT = D / 16;
    static_assert(BK <= 32, "a tile's cache rows are looked up a lane a key");

    // Until pdl_begin() (dependent launches: the kernel before may still run) this reads only
    // what no kernel of the step writes: the host's tables, and cache keys before the new ones.
    FLASH_TRACE_VALUE(8, flash_globaltimer());
    FLASH_TRACE(0);
    FLASH_TRACE_VALUE(11, flash_smid());
    const int group = num_heads / num_kv_heads;
    const int target = gridDim.x - 1 - blockIdx.x;
    const int2 where = one_query ? flash_one_query_tile(num_seqs, group, BQ, target)
                                 : flash_find_tile(query_start_loc, num_seqs, group, BQ, target);
    FLASH_TRACE(1);
    FLASH_TRACE_VALUE(10, where.x < 0 ? 0 : 1);
    if (where.x < 0)  // the same for every thread of the block
        return fd_past_the_last_tile<T, D>(out, query_start_loc, num_seqs, num_tokens, num_heads);
    const int b = where.x, kv_head = blockIdx.y, split = blockIdx.z;
    const int lane = threadIdx.x & 31, kw = threadIdx.x >> 5, g = lane >> 2, t4 = lane & 3;
    const int mi = lane >> 3, mr = lane & 7;  // ldmatrix: which 8x8 matrix and row this lane addresses
    const int* table = block_tables + (long long)b * max_blocks;
    FdTableAhead<BK, STAGES, KW> ta(table, max_blocks, FlashDivisor(block_size), split, min_split_tiles, kw, lane,
                                 table_ahead);
    const FlashRange range = flash_range(query_start_loc, seq_lens, b, where.y, BQ, BK, group, window, split,
                                         num_splits, min_split_tiles, one_query);
    ta.settle(range, split, min_split_tiles);
    if (split >= range.splits) {   // no key tile for this split (the same for the whole block)
        FLASH_TRACE_VALUE(10, 2);
        FLASH_TRACE_VALUE(9, flash_globaltimer());
        return;
    }
    const long long kv_stride = (long long)num_kv_heads * D;
    const FdRows w = fd_rows(range, t4, group);

    float o[DT][4];
#pragma unroll
    for (int d = 0; d < DT; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.0f;
    float m[2] = {-SHARDLINE_INF, -SHARDLINE_INF}, l[2] = {0.0f, 0.0f};
    const float scale2 = scale * FA_LOG2E;  // to log2 units, in flash_softmax_update (scale > 0)
    const FdKvLoader<T, D, BK, STAGES> kv(k_cache, v_cache, table, block_size, kv_head, kv_stride, kw, lane, range);
    const int t = range.t_begin + kw;   // the warp's first key tile
    const int ahead = fd_prologue<T, D, BK, STAGES, KW>(kv, range, t, ta);   // waits for the kernel before
    unsigned qf[DT][2];
    fd_load_q<T, D>(qf, q, range, g, t4, group, num_heads, kv_head);
    fd_key_loop<T, D, BK, STAGES, KW>(o, m, l, kv, qf, w, range, t, ahead, kw, g, mi, mr, window, scale2);

    FLASH_TRACE(4);
    const FlashSink<T, D> sink = {out, partial, num_heads, num_splits, split, range.splits};
    fd_merge_key_warps<T, D, KW, BQ>(o, m, l, range, kw, g, t4, group, num_heads, kv_head, sink);
    FLASH_TRACE(5);
    if (range.splits > 1)
        flash_merge_splits<T, D>(partial, out, counters + (long long)target * gridDim.y + kv_head, num_splits,
                                 range.splits, range.rows_here, range.row0, group, range.q_first, num_heads, kv_head);
    FLASH_TRACE(6);
    FLASH_TRACE_VALUE(9, flash_globaltimer());
}

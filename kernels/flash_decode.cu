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

// bench/flash_decode_trace.py builds this file with FLASH_DECODE_TRACE: thread 0 of each block
// then records clock64 at its phases (slots 0-6), globaltimer at its start and end (8, 9), what
// the block was (10: 0 past the last tile, 1 a tile, 2 a split without keys) and its SM (11).
// Otherwise FLASH_TRACE is nothing.
#ifdef FLASH_DECODE_TRACE
#define FLASH_TRACE_SLOTS 12
__device__ unsigned long long flash_decode_trace[FLASH_DECODE_TRACE * FLASH_TRACE_SLOTS];
__device__ __forceinline__ void flash_trace_put(int slot, unsigned long long value) {
    const unsigned long long block = blockIdx.x + (unsigned long long)gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    if (threadIdx.x == 0 && block < FLASH_DECODE_TRACE) flash_decode_trace[block * FLASH_TRACE_SLOTS + slot] = value;
}
__device__ __forceinline__ unsigned long long flash_globaltimer() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
__device__ __forceinline__ unsigned flash_smid() {
    unsigned id;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(id));
    return id;
}
#define FLASH_TRACE(slot) flash_trace_put(slot, clock64())
#define FLASH_TRACE_VALUE(slot, value) flash_trace_put(slot, value)
#else
#define FLASH_TRACE(slot)
#define FLASH_TRACE_VALUE(slot, value)
#endif

template <typename T, int D, int BK, int STAGES, int KW>
__global__ void __launch_bounds__(KW * 32, 20 / KW)   // 96-101 registers at D = 128, no spill
    flash_decode_kernel(const T* q, const T* k_cache, const T* v_cache, T* out, float* partial,
                        const int* block_tables, int max_blocks, int block_size, const int* seq_lens,
                        const int* query_start_loc, int num_seqs, int num_heads, int num_kv_heads, float scale,
                        int window, int num_splits, int* counters, int num_tokens) {
    constexpr int BQ = 8, LD = D + 8, MT = BK / 16, DT = D / 16, VECS = D / 8;
    static_assert(BK <= 32, "a tile's cache rows are looked up a lane a key");
    extern __shared__ __align__(128) unsigned char smem[];

    // Until pdl_begin() (dependent launches: the kernel before may still run) this reads only
    // what no kernel of the step writes: the host's tables, and cache keys before the new ones.
    FLASH_TRACE_VALUE(8, flash_globaltimer());
    FLASH_TRACE(0);
    FLASH_TRACE_VALUE(11, flash_smid());
    const int group = num_heads / num_kv_heads;
    const int target = gridDim.x - 1 - blockIdx.x;
    const int2 where = flash_find_tile(query_start_loc, num_seqs, group, BQ, target);
    FLASH_TRACE(1);
    FLASH_TRACE_VALUE(10, where.x < 0 ? 0 : 1);
    if (where.x < 0) {  // the same for every thread of the block
        pdl_begin();
        if (blockIdx.x == 0 && blockIdx.y == 0 && blockIdx.z == 0)   // past the last tile
            flash_zero_padding<T, D>(out, query_start_loc, num_seqs, num_tokens, num_heads);
        FLASH_TRACE_VALUE(9, flash_globaltimer());
        return;
    }
    const int b = where.x, kv_head = blockIdx.y, split = blockIdx.z;
    const int lane = threadIdx.x & 31, kw = threadIdx.x >> 5, g = lane >> 2, t4 = lane & 3;
    const int mi = lane >> 3, mr = lane & 7;  // ldmatrix: which 8x8 matrix and row this lane addresses
    const FlashRange range = flash_range(query_start_loc, seq_lens, b, where.y, BQ, BK, group, window, split,
                                         num_splits);
    if (split >= range.splits) {   // no key tile for this split (the same for the whole block)
        FLASH_TRACE_VALUE(10, 2);
        FLASH_TRACE_VALUE(9, flash_globaltimer());
        return;
    }
    const int q_first = range.q_first, row0 = range.row0, rows_here = range.rows_here;
    const int first_pos = range.first_pos, k_lo = range.k_lo, k_hi = range.k_hi;  // keys from first_pos on are new
    const int t_begin = range.t_begin, t_end = range.t_end;
    const int* table = block_tables + (long long)b * max_blocks;
    const long long kv_stride = (long long)num_kv_heads * D;
    const T* tag = nullptr;  // picks the mma and pack overloads

    // The scores and outputs of this lane are rows 2 t4 and 2 t4 + 1 (the mma's columns). Rows past
    // rows_here compute on zero queries and are never written.
    int pos[2];
    for (int i = 0; i < 2; ++i) pos[i] = first_pos + (row0 + 2 * t4 + i) / group;
    const int pos_lo = first_pos + row0 / group, pos_hi = k_hi - 1;

    float o[DT][4];
#pragma unroll
    for (int d = 0; d < DT; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.0f;
    float m[2] = {-SHARDLINE_INF, -SHARDLINE_INF}, l[2] = {0.0f, 0.0f};
    const float scale2 = scale * FA_LOG2E;  // to log2 units, in flash_softmax_update (scale > 0)
    const FlashDivisor per_block(block_size);

    T* stages = reinterpret_cast<T*>(smem) + kw * (STAGES * 2 * BK * LD);  // this warp's [STAGES][K|V][BK][LD]
    // The cache row (block * block_size + offset) of key k_lo + t * BK + lane % BK, 0 past the keys:
    // looked up a tile before the loads that need it, which take it by shuffle.
    auto cache_row_of = [&](int t) {
        const int j = k_lo + t * BK + lane % BK;
        if (t >= t_end || j >= k_hi) return 0;
        const int blk = per_block.div(j);
        return __ldg(table + blk) * block_size + (j - blk * block_size);
    };
    // Each lane copies 16 bytes of a row at a time: column lc of rows lr0, lr0 + STEP, ... of a
    // tile when a warp covers whole rows (D = 16, 32, 64, 128: only the key's cache row changes
    // a copy), else columns and rows computed a copy (D = 80, 96).
    constexpr int STEP = 32 % VECS == 0 ? 32 / VECS : 0;
    const int lr0 = STEP ? lane / VECS : 0, lc = STEP ? (lane % VECS) * 8 : 0;
    const char* k_base = reinterpret_cast<const char*>(k_cache + (long long)kv_head * D + lc);
    const char* v_base = reinterpret_cast<const char*>(v_cache + (long long)kv_head * D + lc);
    const unsigned row_bytes = (unsigned)kv_stride * sizeof(T);
    const unsigned stage0 = smem_u32(stages + lr0 * LD + lc);
    auto load = [&](int t, int stage, int rows) {
        const int left = k_hi - (k_lo + t * BK);   // keys of the tile that exist
        if constexpr (STEP > 0) {
            const unsigned ks = stage0 + stage * 2 * BK * LD * sizeof(T), vs = ks + BK * LD * sizeof(T);
#pragma unroll
            for (int k = 0; k < BK / STEP; ++k) {
                const int r = lr0 + k * STEP;
                const unsigned long long off = (unsigned long long)(unsigned)__shfl_sync(0xffffffffu, rows, r)
                                               * row_bytes;
                cp_async16_at(ks + k * STEP * LD * sizeof(T), k_base + off, r < left);
                cp_async16_at(vs + k * STEP * LD * sizeof(T), v_base + off, r < left);
            }
        } else {
            T* ks = stages + stage * 2 * BK * LD;
            T* vs = ks + BK * LD;
#pragma unroll
            for (int i = lane; i < BK * VECS; i += 32) {   // BK * VECS is a multiple of 32
                const int r = i / VECS, c = (i % VECS) * 8;
                const unsigned long long off = (unsigned long long)(unsigned)__shfl_sync(0xffffffffu, rows, r)
                                               * row_bytes + c * sizeof(T);
                cp_async16(ks + r * LD + c, k_base + off, r < left);
                cp_async16(vs + r * LD + c, v_base + off, r < left);
            }
        }
    };

    // One commit group per tile slot, empty past the last tile (as in flash_attention.cu). The
    // first slots' tiles go before the wait while they hold no new key (as in a decode step).
    int t = t_begin + kw, st = 0;
    for (; st < STAGES - 1 && k_lo + (t + st * KW + 1) * BK <= first_pos; ++st) {
        if (t + st * KW < t_end) load(t + st * KW, st, cache_row_of(t + st * KW));
        asm volatile("cp.async.commit_group;\n" ::);
    }
    int ahead = cache_row_of(t + (STAGES - 1) * KW);
    FLASH_TRACE(2);
    pdl_begin();
    FLASH_TRACE(3);
    for (; st < STAGES - 1; ++st) {
        if (t + st * KW < t_end) load(t + st * KW, st, cache_row_of(t + st * KW));
        asm volatile("cp.async.commit_group;\n" ::);
    }
    // Q as the B operand (dims x rows): row g, dims 2 t4 (+1) and 2 t4 + 8 (+1) of each 16.
    unsigned qf[DT][2];
    const int q_packed = row0 + g;
    const long long q_row = (long long)(q_first + q_packed / group) * num_heads + (long long)kv_head * group
                            + q_packed % group;
#pragma unroll
    for (int kk = 0; kk < DT; ++kk)
#pragma unroll
        for (int h = 0; h < 2; ++h)
            qf[kk][h] = g < rows_here ? *reinterpret_cast<const unsigned*>(q + q_row * D + kk * 16 + 8 * h + 2 * t4)
                                      : 0u;
    for (int it = 0; t < t_end; ++it, t += KW) {
        if (t + (STAGES - 1) * KW < t_end) load(t + (STAGES - 1) * KW, (it + STAGES - 1) % STAGES, ahead);
        asm volatile("cp.async.commit_group;\n" ::);
        ahead = cache_row_of(t + STAGES * KW);
        asm volatile("cp.async.wait_group %0;\n" ::"n"(STAGES - 1));
        __syncwarp();
        const int kb = k_lo + t * BK;
        const T* ks = stages + (it % STAGES) * 2 * BK * LD;
        const T* vs = ks + BK * LD;
        float s[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) s[mt][0] = s[mt][1] = s[mt][2] = s[mt][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < DT; ++kk)
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                unsigned kf[4];  // keys mt * 16 + (mi % 2) * 8 + mr, dims kk * 16 + (mi / 2) * 8
                ldmatrix_x4(kf, ks + (mt * 16 + (mi & 1) * 8 + mr) * LD + kk * 16 + (mi >> 1) * 8);
                mma16816(s[mt], kf, qf[kk][0], qf[kk][1], tag);
            }
        // s[mt][e]: key kb + mt * 16 + g + 8 (e / 2), row 2 t4 + e % 2.
        const bool unmasked = kb + BK <= k_hi && kb + BK - 1 <= pos_lo && (window <= 0 || kb > pos_hi - window);
        float mx[2] = {-SHARDLINE_INF, -SHARDLINE_INF};   // the tile's max raw score a row
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
        flash_softmax_update<0>(s, o, m, l, mx, scale2);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            // P^T as B (keys x rows): the transposes of the two 8 x 8 (key, row) halves.
            const unsigned b0 = movmatrix_trans(pack2(s[mt][0], s[mt][1], tag));
            const unsigned b1 = movmatrix_trans(pack2(s[mt][2], s[mt][3], tag));
#pragma unroll
            for (int dp = 0; dp < DT; ++dp) {
                unsigned vf[4];  // V^T as A: matrix mi is dims dp * 16 + (mi % 2) * 8, keys mt * 16 + (mi / 2) * 8
                ldmatrix_x4_trans(vf, vs + (mt * 16 + (mi >> 1) * 8 + mr) * LD + dp * 16 + (mi & 1) * 8);
                mma16816(o[dp], vf, b0, b1, tag);
            }
        }
        __syncwarp();  // the stage is free for the load STAGES - 1 tiles on
    }
    asm volatile("cp.async.wait_group 0;\n" ::);   // no copy in flight into shared memory reused below
    for (int i = 0; i < 2; ++i)   // each of the 8 lanes of a row summed its own keys
        for (int offset = 4; offset < 32; offset <<= 1) l[i] += __shfl_xor_sync(0xffffffffu, l[i], offset);

    FLASH_TRACE(4);
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
        for (int d = 0; d < DT; ++d) {
            os[r * D + d * 16 + g] = o[d][i];
            os[r * D + d * 16 + g + 8] = o[d][2 + i];
        }
    }
    const FlashSink<T, D> sink = {out, partial, num_heads, num_splits, split, range.splits};
    flash_combine_key_warps<T, D, KW, BQ>(ms, ls, os, rows_here, row0, group, q_first, num_heads, kv_head, sink);
    FLASH_TRACE(5);
    if (range.splits > 1)
        flash_merge_splits<T, D>(partial, out, counters + (long long)target * gridDim.y + kv_head, num_splits,
                                 range.splits, rows_here, row0, group, q_first, num_heads, kv_head);
    FLASH_TRACE(6);
    FLASH_TRACE_VALUE(9, flash_globaltimer());
}

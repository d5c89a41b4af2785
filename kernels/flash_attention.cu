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
// memory by cp.async, STAGES tiles deep (3 for prefill, 2 for decode: see
// bench/flash_tile_sweep.py), rows padded to D + 8 elements so ldmatrix
// meets no bank conflict.
//
// KW (template) says how the 4 warps split the work:
// - KW = 1 (prefill): the warps own 64 rows of one sequence and share every
//   32-key tile;
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

#define FA_WARPS 4
#define FA_THREADS (FA_WARPS * 32)
#define FA_LOG2E 1.4426950408889634f

// Sequence b's tile count.
__device__ __forceinline__ int flash_tiles(const int* query_start_loc, int b, int group, int bq) {
    return ((query_start_loc[b + 1] - query_start_loc[b]) * group + bq - 1) / bq;
}

// (sequence, tile within it) of tile number `target`, or sequence -1 past the last tile.
// Every thread of the block must call it (it synchronises).
__device__ int2 flash_find_tile(const int* query_start_loc, int num_seqs, int group, int bq, int target) {
    __shared__ int counts[FA_THREADS];
    __shared__ int2 found;
    const int tid = threadIdx.x, chunk = (num_seqs + FA_THREADS - 1) / FA_THREADS;
    const int lo = min(num_seqs, tid * chunk), hi = min(num_seqs, lo + chunk);
    int mine = 0;
    for (int s = lo; s < hi; ++s) mine += flash_tiles(query_start_loc, s, group, bq);
    counts[tid] = mine;
    if (tid == 0) found = make_int2(-1, 0);
    __syncthreads();
    for (int offset = 1; offset < FA_THREADS; offset <<= 1) {  // inclusive scan
        const int add = tid >= offset ? counts[tid - offset] : 0;
        __syncthreads();
        counts[tid] += add;
        __syncthreads();
    }
    const int before = counts[tid] - mine;
    if (target >= before && target < before + mine) {
        int t = target - before;
        for (int s = lo; s < hi; ++s) {
            const int n = flash_tiles(query_start_loc, s, group, bq);
            if (t < n) {
                found = make_int2(s, t);
                break;
            }
            t -= n;
        }
    }
    __syncthreads();
    return found;
}

__device__ __forceinline__ unsigned smem_u32(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, asynchronously; zeros when !valid (src is then not read).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
                 "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
}

// c += a b, m16n8k16, fp32 accumulate; the pointer argument picks the input type.
__device__ __forceinline__ void mma16816(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1,
                                         const __nv_bfloat16*) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void mma16816(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1,
                                         const __half*) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats as two storage-type values in one register (lo in the low half).
__device__ __forceinline__ unsigned pack2(float lo, float hi, const __nv_bfloat16*) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&v);
}

__device__ __forceinline__ unsigned pack2(float lo, float hi, const __half*) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&v);
}

// Where a finished row goes: out (normalised) when the launch has one split, else its
// split's slot of `partial` (weighted values, then max in natural-log units and sum).
template <typename T, int D>
struct FlashSink {
    T* out;
    float* partial;
    int num_heads, num_splits, split;

    __device__ __forceinline__ long long row(long long token, long long head) const {
        return token * num_heads + head;
    }
    // acc: sum of 2^(s - m) v over the row's keys; m in log2 units; l: sum of 2^(s - m).
    __device__ __forceinline__ void put2(long long r, int d, float acc0, float acc1, float l) const {
        if (num_splits == 1) {
            const float inv = 1.0f / l;
            out[r * D + d] = from_f<T>(acc0 * inv);
            out[r * D + d + 1] = from_f<T>(acc1 * inv);
        } else {
            float* slot = partial + (r * num_splits + split) * (D + 2);
            slot[d] = acc0;
            slot[d + 1] = acc1;
        }
    }
    __device__ __forceinline__ void put_stats(long long r, float m, float l) const {
        if (num_splits > 1) {
            float* slot = partial + (r * num_splits + split) * (D + 2);
            slot[D] = m == -SHARDLINE_INF ? m : m / FA_LOG2E;
            slot[D + 1] = l;
        }
    }
};

// The rows of out past the last sequence (padding), zeroed by one spare block.
template <typename T, int D>
__device__ void flash_zero_padding(T* out, const int* query_start_loc, int num_seqs, int num_tokens, int num_heads) {
    const long long first = (long long)query_start_loc[num_seqs] * num_heads * D;
    for (long long i = first + threadIdx.x; i < (long long)num_tokens * num_heads * D; i += FA_THREADS)
        out[i] = from_f<T>(0.0f);
}

// KW > 1: the key-warp groups hold the same 16 rows over different keys. Each writes its
// (max, sum, output rows) to shared memory (reusing the K/V stages); the block merges them
// and hands every row to the sink. Every thread of the block calls it.
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
    __syncthreads();
    for (int idx = tid; idx < 16 * (D / 2); idx += FA_THREADS) {
        const int r = idx / (D / 2), d = (idx % (D / 2)) * 2, packed = row0 + r;
        if (r >= rows_here) continue;
        float big = -SHARDLINE_INF;
        for (int w = 0; w < KW; ++w) big = fmaxf(big, ms[w * 16 + r]);
        float sum = 0.0f, acc0 = 0.0f, acc1 = 0.0f;
        for (int w = 0; w < KW; ++w) {
            const float f = ms[w * 16 + r] == -SHARDLINE_INF ? 0.0f : exp2f(ms[w * 16 + r] - big);
            sum += f * ls[w * 16 + r];
            acc0 += f * os[(w * 16 + r) * D + d];
            acc1 += f * os[(w * 16 + r) * D + d + 1];
        }
        const long long orow = (long long)(q_first + packed / group) * num_heads + (long long)kv_head * group
                               + packed % group;
        sink.put2(orow, d, acc0, acc1, sum);
        if (d == 0) sink.put_stats(orow, big, sum);
    }
}

// Called by every thread of a block after its rows' partial results are written: the
// last of the tile's num_splits blocks to get here merges every split's (max, sum,
// weighted values) of the tile's rows into out, as attention_combine_kernel does.
template <typename T, int D>
__device__ void flash_merge_splits(const float* partial, T* out, int* counter, int num_splits, int rows_here,
                                   long long row0, int group, long long q_first, int num_heads, int kv_head) {
    __shared__ int last;
    __threadfence();   // this block's partial rows are visible before it is counted
    __syncthreads();
    if (threadIdx.x == 0) {
        last = atomicAdd(counter, 1) == num_splits - 1;
        if (last) *counter = 0;   // every split has counted: ready for the next launch
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    for (int idx = threadIdx.x; idx < rows_here * D; idx += blockDim.x) {
        const long long packed = row0 + idx / D;
        const int d = idx % D;
        const long long r = (q_first + packed / group) * num_heads + (long long)kv_head * group + packed % group;
        const float* parts = partial + r * num_splits * (D + 2);
        float m = -SHARDLINE_INF;
        for (int s = 0; s < num_splits; ++s) m = fmaxf(m, __ldcg(parts + s * (D + 2) + D));
        float l = 0.0f, acc = 0.0f;
        for (int s = 0; s < num_splits; ++s) {
            const float ms = __ldcg(parts + s * (D + 2) + D);
            if (ms > -SHARDLINE_INF) {
                const float f = expf(ms - m);
                l += f * __ldcg(parts + s * (D + 2) + D + 1);
                acc += f * __ldcg(parts + s * (D + 2) + d);
            }
        }
        out[r * D + d] = from_f<T>(acc / l);
    }
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
    constexpr int BK = KW == 1 ? 32 : 16;  // keys per tile
    constexpr int STAGES = KW == 1 ? 3 : 2;  // K/V tiles a warp group has in flight
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
    const int q_first = query_start_loc[b], num_q = query_start_loc[b + 1] - q_first;
    const int row0 = where.y * BQ, rows_here = min(BQ, num_q * group - row0);
    const int first_pos = seq_lens[b] - num_q;  // position of query 0
    const int k_hi = first_pos + (row0 + rows_here - 1) / group + 1;
    const int k_lo = window > 0 ? max(0, first_pos + row0 / group - window + 1) : 0;
    const int tiles = (k_hi - k_lo + BK - 1) / BK, per_split = (tiles + num_splits - 1) / num_splits;
    const int t_begin = split * per_split, t_end = min(tiles, t_begin + per_split);
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
    const float scale2 = scale * FA_LOG2E;  // scores in log2 units: exp2f below

    T* stages = reinterpret_cast<T*>(smem) + kw * (STAGES * 2 * BK * LD);  // this group's [STAGES][K|V][BK][LD]
    const int gtid = tid - kw * RW * 32;
    auto load = [&](int t, int stage) {
        T* ks = stages + stage * 2 * BK * LD;
        T* vs = ks + BK * LD;
        const int kb = k_lo + t * BK;
        for (int i = gtid; i < BK * VECS; i += RW * 32) {
            const int r = i / VECS, c = (i % VECS) * 8, j = kb + r;
            const bool ok = j < k_hi;
            const long long off = ok ? ((long long)table[j / block_size] * block_size + j % block_size) * kv_stride
                                           + (long long)kv_head * D + c
                                     : 0;
            cp_async16(ks + r * LD + c, k_cache + off, ok);
            cp_async16(vs + r * LD + c, v_cache + off, ok);
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
            float mx[2] = {m[0], m[1]};
            const bool unmasked = warp_full && kb + BK <= k_hi && kb + BK - 1 <= warp_pos_lo
                                  && (window <= 0 || kb > warp_pos_hi - window);
#pragma unroll
            for (int n = 0; n < NT; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int i = e >> 1, j = kb + n * 8 + 2 * t4 + (e & 1);
                    const bool seen = unmasked || (valid[i] && j < k_hi && j <= pos[i]
                                                   && (window <= 0 || j > pos[i] - window));
                    s[n][e] = seen ? s[n][e] * scale2 : -SHARDLINE_INF;
                    mx[i] = fmaxf(mx[i], s[n][e]);
                }
            float alpha[2];
            for (int i = 0; i < 2; ++i) {
                mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
                mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
                alpha[i] = mx[i] == -SHARDLINE_INF ? 1.0f : exp2f(m[i] - mx[i]);  // 0 while m was -inf
                m[i] = mx[i];
                l[i] *= alpha[i];
            }
#pragma unroll
            for (int n = 0; n < NT; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int i = e >> 1;
                    s[n][e] = m[i] == -SHARDLINE_INF ? 0.0f : exp2f(s[n][e] - m[i]);
                    l[i] += s[n][e];
                }
            // Once the running max settles, alpha is 1 for every row of the warp: skip the rescale.
            if (__any_sync(0xffffffffu, alpha[0] != 1.0f || alpha[1] != 1.0f)) {
#pragma unroll
                for (int d = 0; d < DT; ++d) {
                    o[d][0] *= alpha[0];
                    o[d][1] *= alpha[0];
                    o[d][2] *= alpha[1];
                    o[d][3] *= alpha[1];
                }
            }
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

    const FlashSink<T, D> sink = {out, partial, num_heads, num_splits, split};
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
                                 rows_here, row0, group, q_first, num_heads, kv_head);
}

// Pieces shared by the tensor-core attention kernels (flash_attention.cu for
// prefill and mixed launches, flash_decode.cu for decode rows): the block-wide
// tile lookup, cp.async / ldmatrix / mma.sync wrappers, where finished rows go
// (FlashSink), and the merges of partial softmax results across a block's key
// warps and across split blocks. Compiled in front of each of those files.

// The paged-attention kernels' parameters (flash_attention_kernel, flash_prefill_kernel,
// flash_prefill_sm90_kernel: one launch signature, CudaOps passes the same arguments to each).
#define FLASH_PAGED_PARAMS                                                                                         \
    const T *q, const T *k_cache, const T *v_cache, T *out, float *partial, const int *block_tables, int max_blocks, \
        int block_size, const int *seq_lens, const int *query_start_loc, int num_seqs, int num_heads,              \
        int num_kv_heads, float scale, int window, int num_splits, int *counters, int num_tokens, int heads_first

#define FA_WARPS 4
#define FA_THREADS (FA_WARPS * 32)
#define FA_MAX_THREADS 256   // flash_decode.cu: 8 key warps
#define FA_LOG2E 1.4426950408889634f
#define FLASH_MERGE_LOADS 8   // splits whose partial rows flash_merge_splits loads at once

// Sequence b's tile count.
__device__ __forceinline__ int flash_tiles(const int* query_start_loc, int b, int group, int bq) {
    return ((query_start_loc[b + 1] - query_start_loc[b]) * group + bq - 1) / bq;
}

// A prefill block's (tile number, KV head). Blocks start in the order of their linear index
// (x fastest), and a sequence's last tiles see the most keys (causal), so tiles go last to
// first. heads_first reads (x, y) as one index with the KV heads fastest: every head's longest
// tiles start before any head's shorter ones. Off, block (x, y) takes head y's tile
// gridDim.x - 1 - x, so one head's short tiles start before the next head's long ones. Block
// (0, 0) has tile gridDim.x - 1 of head 0 either way.
__device__ __forceinline__ int2 flash_block_tile(int heads_first) {
    if (!heads_first) return make_int2(gridDim.x - 1 - blockIdx.x, blockIdx.y);
    const int i = blockIdx.y * gridDim.x + blockIdx.x;
    return make_int2(gridDim.x - 1 - i / gridDim.y, i % gridDim.y);
}

// (sequence, tile within it) of tile number `target`, or sequence -1 past the last tile.
// Every thread of the block must call it (it synchronises once); blockDim.x is a multiple of 32.
__device__ int2 flash_find_tile(const int* query_start_loc, int num_seqs, int group, int bq, int target) {
    __shared__ int totals[FA_MAX_THREADS / 32];   // blockDim.x <= FA_MAX_THREADS
    __shared__ int2 found;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int chunk = (num_seqs + blockDim.x - 1) / blockDim.x;
    const int lo = min(num_seqs, tid * chunk), hi = min(num_seqs, lo + chunk);
    int mine = 0;
    for (int s = lo; s < hi; ++s) mine += flash_tiles(query_start_loc, s, group, bq);
    // inclusive scan of the threads' counts: within each warp by shuffles, then the warps before
    int upto = mine;
    for (int offset = 1; offset < 32; offset <<= 1) {
        const int add = __shfl_up_sync(0xffffffffu, upto, offset);
        if (lane >= offset) upto += add;
    }
    if (lane == 31) totals[warp] = upto;
    if (tid == 0) found = make_int2(-1, 0);
    __syncthreads();
    for (int w = 0; w < warp; ++w) upto += totals[w];
    const int before = upto - mine;
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

// flash_find_tile's answer where every sequence has one query (one_query in flash_range): sequence
// b's ceil(group / bq) tiles in turn, found without reading query_start_loc.
__device__ __forceinline__ int2 flash_one_query_tile(int num_seqs, int group, int bq, int target) {
    const int per_seq = (group + bq - 1) / bq;
    return target < num_seqs * per_seq ? make_int2(target / per_seq, target % per_seq) : make_int2(-1, 0);
}

// A block's rows and keys: sequence b's row tile `tile` (BQ packed rows from row0, rows_here
// of them real) and its split's run [t_begin, t_end) of the key tiles (BK keys from k_lo) that
// its rows see; first_pos is the position of the sequence's first query of the launch. The
// key tiles go to the splits in equal runs, so a context may fill only `splits` of the
// launch's num_splits (fewer key tiles than splits, or runs rounded up); the blocks of the
// higher splits have nothing to do. A run holds at least min_split_tiles key tiles (flash_decode:
// short contexts fill fewer splits, each merged split costing more than its keys). With one_query
// (a decode step's launch: query_start_loc is 0, 1, ..., num_seqs) sequence b's query is row b,
// read from no table.
struct FlashRange {
    int q_first, num_q, row0, rows_here, first_pos, k_lo, k_hi, t_begin, t_end, splits;
};

__device__ __forceinline__ FlashRange flash_range(const int* query_start_loc, const int* seq_lens, int b, int tile,
                                                  int bq, int bk, int group, int window, int split, int num_splits,
                                                  int min_split_tiles = 1, bool one_query = false) {
    FlashRange r;
    r.q_first = one_query ? b : query_start_loc[b];
    r.num_q = one_query ? 1 : query_start_loc[b + 1] - r.q_first;
    r.row0 = tile * bq;
    r.rows_here = min(bq, r.num_q * group - r.row0);
    r.first_pos = seq_lens[b] - r.num_q;
    r.k_hi = r.first_pos + (r.row0 + r.rows_here - 1) / group + 1;
    r.k_lo = window > 0 ? max(0, r.first_pos + r.row0 / group - window + 1) : 0;
    const int tiles = (r.k_hi - r.k_lo + bk - 1) / bk;
    const int per_split = max(min_split_tiles, (tiles + num_splits - 1) / num_splits);
    r.splits = max(1, min(num_splits, (tiles + per_split - 1) / per_split));
    r.t_begin = split * per_split;
    r.t_end = min(tiles, r.t_begin + per_split);
    return r;
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

// The transpose of an 8 x 8 matrix of 16-bit values held in mma fragment layout (lane l holds
// row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1).
__device__ __forceinline__ unsigned movmatrix_trans(unsigned a) {
    unsigned d;
    asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(d) : "r"(a));
    return d;
}

// c += a b, m16n8k16, fp32 accumulate; the pointer argument picks the input type (one overload
// a type: the PTX names it in the instruction, and asm takes only a literal).
#define FLASH_MMA16816(T, PTX_TYPE)                                                                          \
    __device__ __forceinline__ void mma16816(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1,  \
                                             const T*) {                                                     \
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." PTX_TYPE "." PTX_TYPE ".f32 "                    \
                     "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"                      \
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                          \
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));                          \
    }
FLASH_MMA16816(__nv_bfloat16, "bf16")
FLASH_MMA16816(__half, "f16")
#undef FLASH_MMA16816

// 2^x on the special function unit (ex2.approx, denormals flushed to zero; 2^-inf = 0): exp2f
// wraps the same instruction in range checks that softmax weights, rounded to bf16 or fp16 for
// the P V mma, have no use for.
__device__ __forceinline__ float flash_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// n / d for one divisor d >= 1 and many n in [0, 2^31): a multiply-high, an add and a shift
// (Granlund and Montgomery's division by an invariant integer) where an integer division takes
// tens of instructions. The kernels divide key positions by the cache's block size with it,
// once per 16 bytes they copy.
struct FlashDivisor {
    unsigned m, l;
    __device__ explicit FlashDivisor(int d) {
        l = 32 - __clz(d - 1);   // ceil(log2 d): 0 for d = 1
        m = (unsigned)(((1ull << 32) * ((1ull << l) - d)) / d + 1);
    }
    __device__ __forceinline__ int div(int n) const { return (int)((__umulhi((unsigned)n, m) + (unsigned)n) >> l); }
};

// 16 bytes global -> shared at a shared-memory address, as cp_async16.
__device__ __forceinline__ void cp_async16_at(unsigned dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
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

// The online softmax's step over one tile of a warp's raw scores s (q . k; -inf where masked),
// given tile_max, each row's max of them (reduced over the lanes sharing a row), and scale2 > 0
// (the softmax scale in log2 units). m, the running max, is in scaled log2 units: it becomes
// mx = max(m, tile_max * scale2), l scales by alpha = 2^(m - mx), and s becomes
// 2^(s * scale2 - mx) (one fma and one ex2), added to l. The output takes alpha after
// (flash_rescale). This lane's accumulator element e belongs to its row (e >> ROW_SHIFT) & 1 of
// two: flash_attention.cu's rows are the mma's M (ROW_SHIFT 1), flash_decode.cu's its N
// (ROW_SHIFT 0).

template <int ROW_SHIFT, int N>
__device__ __forceinline__ void flash_softmax_exp(float (&s)[N][4], float (&m)[2], float (&l)[2],
                                                 const float (&tile_max)[2], float scale2, float (&alpha)[2]) {
    float base[2];
    for (int i = 0; i < 2; ++i) {
        const float mx = fmaxf(m[i], tile_max[i] * scale2);
        alpha[i] = mx == -SHARDLINE_INF ? 1.0f : flash_exp2(m[i] - mx);  // 0 while m was -inf
        m[i] = mx;
        l[i] *= alpha[i];
        base[i] = mx == -SHARDLINE_INF ? 0.0f : mx;  // a row that saw no key: its s are all -inf, 2^s = 0
    }
#pragma unroll
    for (int n = 0; n < N; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int i = (e >> ROW_SHIFT) & 1;
            s[n][e] = flash_exp2(fmaf(s[n][e], scale2, -base[i]));
            l[i] += s[n][e];
        }
}

// o *= alpha by rows (flash_softmax_exp's), skipped when no row of the warp moved its max.
template <int ROW_SHIFT, int DT>
__device__ __forceinline__ void flash_rescale(float (&o)[DT][4], const float (&alpha)[2]) {
    if (__any_sync(0xffffffffu, alpha[0] != 1.0f || alpha[1] != 1.0f)) {
#pragma unroll
        for (int d = 0; d < DT; ++d)
#pragma unroll
            for (int e = 0; e < 4; ++e) o[d][e] *= alpha[(e >> ROW_SHIFT) & 1];
    }
}

// Both steps at once.
template <int ROW_SHIFT, int N, int DT>
__device__ __forceinline__ void flash_softmax_update(float (&s)[N][4], float (&o)[DT][4], float (&m)[2],
                                                    float (&l)[2], const float (&tile_max)[2], float scale2) {
    float alpha[2];
    flash_softmax_exp<ROW_SHIFT>(s, m, l, tile_max, scale2, alpha);
    flash_rescale<ROW_SHIFT>(o, alpha);
}

// A row's sums l over its 4 lanes (each summed its own columns), for the mma's rows-as-M layout
// (flash_attention.cu, flash_prefill.cu, flash_prefill_sm90.cu): lanes t4 0-3 of a row share it.
__device__ __forceinline__ void flash_row_sums(float (&l)[2]) {
    for (int i = 0; i < 2; ++i) {
        l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
        l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
    }
}

// Where a finished row goes: out (normalised) when the tile's keys took one split, else its
// split's slot of `partial` (weighted values, then max in natural-log units and sum), slots
// num_splits (the launch's) apart.
template <typename T, int D>
struct FlashSink {
    T* out;
    float* partial;
    int num_heads, num_splits, split, splits;

    __device__ __forceinline__ long long row(long long token, long long head) const {
        return token * num_heads + head;
    }
    // acc: sum of 2^(s - m) v over the row's keys; m in log2 units; l: sum of 2^(s - m).
    __device__ __forceinline__ void put2(long long r, int d, float acc0, float acc1, float l) const {
        if (splits == 1) {
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
        if (splits > 1) {
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
    for (long long i = first + threadIdx.x; i < (long long)num_tokens * num_heads * D; i += blockDim.x)
        out[i] = from_f<T>(0.0f);
}

// A prefill block's start: its tile number `target` and KV head (flash_block_tile), and the
// sequence b and tile of it that number is (flash_find_tile), b < 0 past the last tile, where
// block (0, 0, 0) has zeroed the rows of out past the last sequence (padding) and every block
// returns. Every thread of the block calls it.
struct FlashBlock {
    int b, tile, target, kv_head;
};
template <typename T, int D>
__device__ __forceinline__ FlashBlock flash_block_start(int heads_first, const int* query_start_loc, int num_seqs,
                                                        int group, int bq, T* out, int num_tokens, int num_heads) {
    const int2 tile = flash_block_tile(heads_first);   // longest tiles first
    const int2 where = flash_find_tile(query_start_loc, num_seqs, group, bq, tile.x);
    FlashBlock at;
    at.b = where.x, at.tile = where.y, at.target = tile.x, at.kv_head = tile.y;
    if (where.x < 0) {
        if (blockIdx.x == 0 && blockIdx.y == 0 && blockIdx.z == 0)
            flash_zero_padding<T, D>(out, query_start_loc, num_seqs, num_tokens, num_heads);
    }
    return at;
}

// KW > 1: the block's KW key warps hold the same R rows over different keys, and each has
// written its rows' (max in log2 units, sum, weighted values) to ms [KW][R], ls [KW][R]
// and os [KW][R][D] in shared memory. Merges them and hands every row to the sink.
// Every thread of the block calls it.
template <typename T, int D, int KW, int R>
__device__ void flash_combine_key_warps(const float* ms, const float* ls, const float* os, int rows_here,
                                        int row0, int group, int q_first, int num_heads, int kv_head,
                                        const FlashSink<T, D>& sink) {
    __syncthreads();
    for (int idx = threadIdx.x; idx < R * (D / 2); idx += blockDim.x) {
        const int r = idx / (D / 2), d = (idx % (D / 2)) * 2, packed = row0 + r;
        if (r >= rows_here) continue;
        float big = -SHARDLINE_INF;
        for (int w = 0; w < KW; ++w) big = fmaxf(big, ms[w * R + r]);
        float sum = 0.0f, acc0 = 0.0f, acc1 = 0.0f;
        for (int w = 0; w < KW; ++w) {
            const float f = ms[w * R + r] == -SHARDLINE_INF ? 0.0f : exp2f(ms[w * R + r] - big);
            sum += f * ls[w * R + r];
            acc0 += f * os[(w * R + r) * D + d];
            acc1 += f * os[(w * R + r) * D + d + 1];
        }
        const long long orow = (long long)(q_first + packed / group) * num_heads + (long long)kv_head * group
                               + packed % group;
        sink.put2(orow, d, acc0, acc1, sum);
        if (d == 0) sink.put_stats(orow, big, sum);
    }
}

// Called by every thread of a block after its rows' partial results are written: the
// last of the tile's `splits` blocks to get here merges every split's (max, sum,
// weighted values) of the tile's rows into out, as attention_combine_kernel does. A
// thread takes two dimensions of a row and loads FLASH_MERGE_LOADS splits' statistics and
// values of them at once, so the merge costs one round trip to L2 after the count for up
// to that many splits (more loads at once spill registers of flash_decode_kernel).
template <typename T, int D>
__device__ void flash_merge_splits(const float* partial, T* out, int* counter, int num_splits, int splits,
                                   int rows_here, long long row0, int group, long long q_first, int num_heads,
                                   int kv_head) {
    __shared__ int last;
    __threadfence();   // this block's partial rows are visible before it is counted
    __syncthreads();
    if (threadIdx.x == 0) {
        last = atomicAdd(counter, 1) == splits - 1;
        if (last) *counter = 0;   // every split has counted: ready for the next launch
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    for (int idx = threadIdx.x; idx < rows_here * (D / 2); idx += blockDim.x) {
        const int r = idx / (D / 2), d = (idx % (D / 2)) * 2;
        const long long packed = row0 + r;
        const long long row = (q_first + packed / group) * num_heads + (long long)kv_head * group + packed % group;
        const float* slots = partial + row * num_splits * (D + 2);   // D + 2 and d even: 8-byte aligned
        float m = -SHARDLINE_INF, l = 0.0f, acc0 = 0.0f, acc1 = 0.0f;   // max so far, sums scaled by it
        for (int s0 = 0; s0 < splits; s0 += FLASH_MERGE_LOADS) {
            float2 stats[FLASH_MERGE_LOADS], values[FLASH_MERGE_LOADS];   // (max, sum), dims d, d + 1 a split
#pragma unroll
            for (int i = 0; i < FLASH_MERGE_LOADS; ++i)
                if (s0 + i < splits) {
                    stats[i] = __ldcg(reinterpret_cast<const float2*>(slots + (s0 + i) * (D + 2) + D));
                    values[i] = __ldcg(reinterpret_cast<const float2*>(slots + (s0 + i) * (D + 2) + d));
                }
            float big = m;
#pragma unroll
            for (int i = 0; i < FLASH_MERGE_LOADS; ++i)
                if (s0 + i < splits) big = fmaxf(big, stats[i].x);
            const float keep = m > -SHARDLINE_INF ? expf(m - big) : 0.0f;
            l *= keep;
            acc0 *= keep;
            acc1 *= keep;
#pragma unroll
            for (int i = 0; i < FLASH_MERGE_LOADS; ++i)
                if (s0 + i < splits) {
                    const float f = stats[i].x > -SHARDLINE_INF ? expf(stats[i].x - big) : 0.0f;
                    l += f * stats[i].y;
                    acc0 += f * values[i].x;
                    acc1 += f * values[i].y;
                }
            m = big;
        }
        const float inv = 1.0f / l;
        out[row * D + d] = from_f<T>(acc0 * inv);
        out[row * D + d + 1] = from_f<T>(acc1 * inv);
    }
}

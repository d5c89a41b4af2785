// Flash-style causal GQA attention over the paged KV cache on tensor cores
// (WMMA 16x16x16, bf16 or fp16 in, fp32 accumulate), for prefill rows and
// for decode batches large enough to fill the GPU.
//
// Rows are packed per KV head: sequence b's row R = i * G + g is query i of
// that sequence under query head kv_head * G + g (G = num_heads /
// num_kv_heads), so the G heads sharing a KV head share every K and V load
// (decode rows of one sequence fill G rows of a tile instead of G tiles).
// One block of FP_WARPS warps per (tile of FP_BQ packed rows of one
// sequence, KV head); each warp owns 16 of the tile's rows and skips its
// math when none of them is a real row. The block walks the keys visible to
// the tile in tiles of FP_BK: it loads their K and V rows into shared memory
// (through the block table), each warp computes its 16 x FP_BK scores
// S = Q K^T with mma, applies scale, the causal mask and the sliding window,
// updates its rows' online softmax (running max m and sum l, two lanes per
// row), writes P in the storage type, rescales its rows of the fp32 output O
// (kept in shared memory) and adds P V with mma. At the end O / l goes out.
// P is rounded to the storage type before P V, as flash attention does.
//
// Tiles are numbered over the sequences in order (sequence b has
// ceil(num_q_b * G / FP_BQ)); the block finds its own with a block-wide scan
// of those counts, so the grid may be an upper bound and no host sync or
// host-built table is needed (graph-capturable). Blocks past the last tile
// exit. Rows of q past query_start_loc[num_seqs] are not written (the
// caller zeroes them).
//
// Shapes: q [num_tokens, num_heads, head_dim]; caches [num_blocks,
// block_size, num_kv_heads, head_dim]; head_dim a multiple of 16, at most
// 128. blockDim.x == FP_WARPS * 32. Dynamic shared memory: see
// cuda_common.flash_smem_bytes.

#include <mma.h>

#define FP_BQ 64
#define FP_BK 64
#define FP_WARPS 4
#define FP_THREADS (FP_WARPS * 32)

// Sequence b's tile count.
__device__ __forceinline__ int flash_tiles(const int* query_start_loc, int b, int group) {
    return ((query_start_loc[b + 1] - query_start_loc[b]) * group + FP_BQ - 1) / FP_BQ;
}

// (sequence, tile within it) of tile number `target`, or sequence -1 past the last tile.
// Every thread of the block must call it (it synchronises).
__device__ int2 flash_find_tile(const int* query_start_loc, int num_seqs, int group, int target) {
    __shared__ int counts[FP_THREADS];
    __shared__ int2 found;
    const int tid = threadIdx.x, chunk = (num_seqs + FP_THREADS - 1) / FP_THREADS;
    const int lo = min(num_seqs, tid * chunk), hi = min(num_seqs, lo + chunk);
    int mine = 0;
    for (int s = lo; s < hi; ++s) mine += flash_tiles(query_start_loc, s, group);
    counts[tid] = mine;
    if (tid == 0) found = make_int2(-1, 0);
    __syncthreads();
    for (int offset = 1; offset < FP_THREADS; offset <<= 1) {  // inclusive scan
        const int add = tid >= offset ? counts[tid - offset] : 0;
        __syncthreads();
        counts[tid] += add;
        __syncthreads();
    }
    const int before = counts[tid] - mine;
    if (target >= before && target < before + mine) {
        int t = target - before;
        for (int s = lo; s < hi; ++s) {
            const int n = flash_tiles(query_start_loc, s, group);
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

using FlashAcc = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;

// acc += A B for one warp: A is 16 rows x 16 * k_tiles (row-major, lda), B is
// 16 * k_tiles x 16 in layout BLayout (ldb), its k-th 16-slice `b_step` elements on.
template <typename T, typename BLayout>
__device__ __forceinline__ void mma_rows(FlashAcc& acc, const T* a, int lda, const T* b, int ldb, int b_step,
                                         int k_tiles) {
    using namespace nvcuda;
    for (int k = 0; k < k_tiles; ++k) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a_frag;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLayout> b_frag;
        wmma::load_matrix_sync(a_frag, a + k * 16, lda);
        wmma::load_matrix_sync(b_frag, b + k * b_step, ldb);
        wmma::mma_sync(acc, a_frag, b_frag, acc);
    }
}

template <typename T>
__global__ void flash_prefill_kernel(const T* q, const T* k_cache, const T* v_cache, T* out,
                                     const int* block_tables, int max_blocks, int block_size, const int* seq_lens,
                                     const int* query_start_loc, int num_seqs, int num_heads, int num_kv_heads,
                                     int head_dim, float scale, int window) {
    using namespace nvcuda;
    extern __shared__ __align__(128) unsigned char smem[];
    const int D = head_dim, group = num_heads / num_kv_heads;
    T* q_s = reinterpret_cast<T*>(smem);                         // [FP_BQ][D]
    T* k_s = q_s + FP_BQ * D;                                    // [FP_BK][D]
    T* v_s = k_s + FP_BK * D;                                    // [FP_BK][D]
    T* p_s = v_s + FP_BK * D;                                    // [FP_BQ][FP_BK]
    float* s_s = reinterpret_cast<float*>(p_s + FP_BQ * FP_BK);  // [FP_BQ][FP_BK]
    float* o_s = s_s + FP_BQ * FP_BK;                            // [FP_BQ][D]

    const int2 where = flash_find_tile(query_start_loc, num_seqs, group, blockIdx.x);
    if (where.x < 0) return;  // the same for every thread of the block
    const int b = where.x, kv_head = blockIdx.y;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int q_first = query_start_loc[b], num_q = query_start_loc[b + 1] - q_first;
    const int row0 = where.y * FP_BQ;                            // the tile's first packed row
    const int rows_here = min(FP_BQ, num_q * group - row0);
    const int first_pos = seq_lens[b] - num_q;                   // position of query 0
    const int k_hi = first_pos + (row0 + rows_here - 1) / group + 1;  // keys < k_hi: visible to some row
    const int k_lo = window > 0 ? max(0, first_pos + row0 / group - window + 1) : 0;
    const int* table = block_tables + (long long)b * max_blocks;
    const long long kv_stride = (long long)num_kv_heads * D;
    const int vecs = D / 8;                                      // 16-byte vectors per row

    for (int i = tid; i < FP_BQ * vecs; i += FP_THREADS) {
        const int r = i / vecs, c = (i % vecs) * 8, packed = row0 + r;
        uint4 val = make_uint4(0, 0, 0, 0);
        if (r < rows_here) {
            const long long token = q_first + packed / group, head = (long long)kv_head * group + packed % group;
            val = *reinterpret_cast<const uint4*>(q + (token * num_heads + head) * D + c);
        }
        *reinterpret_cast<uint4*>(q_s + r * D + c) = val;
    }
    for (int i = tid; i < FP_BQ * D; i += FP_THREADS) o_s[i] = 0.0f;

    // Two lanes per row: row r of the tile, columns [half * FP_BK / 2, ...).
    const int rl = lane >> 1, half = lane & 1, r = warp * 16 + rl;
    const bool row_valid = r < rows_here, warp_busy = warp * 16 < rows_here;
    const int pos = first_pos + (row0 + r) / group;
    float m = -SHARDLINE_INF, l = 0.0f;

    for (int kb = k_lo; kb < k_hi; kb += FP_BK) {
        __syncthreads();  // every warp is done with the previous tile's K and V
        for (int i = tid; i < FP_BK * vecs; i += FP_THREADS) {
            const int j = kb + i / vecs, c = (i % vecs) * 8;
            uint4 kv = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);
            if (j < k_hi) {
                const long long off = ((long long)table[j / block_size] * block_size + j % block_size) * kv_stride
                                      + (long long)kv_head * D + c;
                kv = *reinterpret_cast<const uint4*>(k_cache + off);
                vv = *reinterpret_cast<const uint4*>(v_cache + off);
            }
            *reinterpret_cast<uint4*>(k_s + (i / vecs) * D + c) = kv;
            *reinterpret_cast<uint4*>(v_s + (i / vecs) * D + c) = vv;
        }
        __syncthreads();
        if (!warp_busy) continue;  // uniform across the warp; it still meets every __syncthreads

        // S = Q K^T for this warp's 16 rows (K^T: K's rows read column-major).
        for (int n = 0; n < FP_BK / 16; ++n) {
            FlashAcc acc;
            wmma::fill_fragment(acc, 0.0f);
            mma_rows<T, wmma::col_major>(acc, q_s + warp * 16 * D, D, k_s + n * 16 * D, D, 16, D / 16);
            wmma::store_matrix_sync(s_s + warp * 16 * FP_BK + n * 16, acc, FP_BK, wmma::mem_row_major);
        }
        __syncwarp();

        // Online softmax of row r over this key tile (two lanes per row).
        float* s_row = s_s + r * FP_BK;
        T* p_row = p_s + r * FP_BK;
        // Columns visited from a lane-dependent start, so the lanes' accesses fall in
        // different shared-memory banks (rows are FP_BK floats apart: same bank otherwise).
        const int c0 = half * (FP_BK / 2);
        float tile_max = -SHARDLINE_INF;
        for (int i = 0; i < FP_BK / 2; ++i) {
            const int c = c0 + ((i + lane) & (FP_BK / 2 - 1)), j = kb + c;
            const bool visible = row_valid && j < k_hi && j <= pos && (window <= 0 || j > pos - window);
            const float s = visible ? s_row[c] * scale : -SHARDLINE_INF;
            s_row[c] = s;
            tile_max = fmaxf(tile_max, s);
        }
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
        const float new_m = fmaxf(m, tile_max);
        const bool none_yet = new_m == -SHARDLINE_INF;             // no visible key so far
        const float alpha = none_yet ? 1.0f : expf(m - new_m);      // 0 when m was -inf
        float sum = 0.0f;
        for (int i = 0; i < FP_BK / 2; ++i) {
            const int c = c0 + ((i + lane) & (FP_BK / 2 - 1));
            const float p = none_yet ? 0.0f : expf(s_row[c] - new_m);
            p_row[c] = from_f<T>(p);
            sum += p;
        }
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        l = l * alpha + sum;
        m = new_m;
        for (int i = 0; i < D / 2; ++i) o_s[r * D + half * (D / 2) + (i + lane) % (D / 2)] *= alpha;
        __syncwarp();

        // O += P V for this warp's rows.
        for (int cd = 0; cd < D / 16; ++cd) {
            FlashAcc acc;
            wmma::load_matrix_sync(acc, o_s + warp * 16 * D + cd * 16, D, wmma::mem_row_major);
            mma_rows<T, wmma::row_major>(acc, p_s + warp * 16 * FP_BK, FP_BK, v_s + cd * 16, D, 16 * D, FP_BK / 16);
            wmma::store_matrix_sync(o_s + warp * 16 * D + cd * 16, acc, D, wmma::mem_row_major);
        }
        __syncwarp();
    }

    if (row_valid) {
        const long long token = q_first + (row0 + r) / group, head = (long long)kv_head * group + (row0 + r) % group;
        T* out_row = out + (token * num_heads + head) * D;
        const float inv = 1.0f / l;
        for (int i = 0; i < D / 2; ++i) {
            const int d = half * (D / 2) + (i + lane) % (D / 2);
            out_row[d] = from_f<T>(o_s[r * D + d] * inv);
        }
    }
}

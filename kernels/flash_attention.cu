// Flash-style causal GQA attention for prefill rows over the paged KV cache,
// on tensor cores (WMMA, 16x16x16, bf16 or fp16 in, fp32 accumulate).
//
// One block of FP_WARPS warps per (tile of FP_BQ query rows of one sequence,
// query head). Each warp owns 16 of the tile's rows. The block walks the
// sequence's visible keys in tiles of FP_BK: it loads the K and V rows of a
// tile into shared memory (through the block table), each warp computes its
// 16 x FP_BK scores S = Q K^T with mma, applies scale, the causal mask and the
// sliding window, updates its rows' online softmax (running max m and sum l,
// two lanes per row), writes P in the storage type, rescales its rows of the
// fp32 output O (kept in shared memory) and adds P V with mma. At the end
// O / l goes out. P is rounded to the storage type before P V, as flash
// attention does.
//
// Tiles are numbered over the sequences in order: sequence b has
// ceil(num_q_b / FP_BQ) of them; a block whose number is past the last one
// exits, so the grid may be an upper bound (graph-friendly). Rows of q past
// query_start_loc[num_seqs] are not written (the caller zeroes them).
//
// Shapes: q [num_tokens, num_heads, head_dim]; caches [num_blocks,
// block_size, num_kv_heads, head_dim]; head_dim a multiple of 16, at most
// 128. Dynamic shared memory: flash_prefill_smem_bytes(head_dim).

#include <mma.h>

#define FP_BQ 64
#define FP_BK 64
#define FP_WARPS 4

template <typename T>
__global__ void flash_prefill_kernel(const T* q, const T* k_cache, const T* v_cache, T* out,
                                     const int* block_tables, int max_blocks, int block_size, const int* seq_lens,
                                     const int* query_start_loc, int num_seqs, int num_heads, int num_kv_heads,
                                     int head_dim, float scale, int window) {
    using namespace nvcuda;
    extern __shared__ __align__(128) unsigned char smem[];
    const int D = head_dim;
    T* q_s = reinterpret_cast<T*>(smem);                       // [FP_BQ][D]
    T* k_s = q_s + FP_BQ * D;                                  // [FP_BK][D]
    T* v_s = k_s + FP_BK * D;                                  // [FP_BK][D]
    T* p_s = v_s + FP_BK * D;                                  // [FP_BQ][FP_BK]
    float* s_s = reinterpret_cast<float*>(p_s + FP_BQ * FP_BK);  // [FP_BQ][FP_BK]
    float* o_s = s_s + FP_BQ * FP_BK;                          // [FP_BQ][D]

    // Which sequence and which of its query tiles this block is.
    int tile = blockIdx.x, b = 0;
    for (; b < num_seqs; ++b) {
        const int tiles = (query_start_loc[b + 1] - query_start_loc[b] + FP_BQ - 1) / FP_BQ;
        if (tile < tiles) break;
        tile -= tiles;
    }
    if (b == num_seqs) return;
    const int head = blockIdx.y, kv_head = head / (num_heads / num_kv_heads);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int q_first = query_start_loc[b], num_q = query_start_loc[b + 1] - q_first;
    const int seq_len = seq_lens[b], q0 = tile * FP_BQ;          // q0: the tile's first row in the sequence
    const int rows_here = min(FP_BQ, num_q - q0);
    const int pos0 = seq_len - num_q + q0;                      // position of the tile's first row
    const int k_hi = pos0 + rows_here;                          // keys < k_hi are visible to some row
    const int k_lo = window > 0 ? max(0, pos0 - window + 1) : 0;
    const int* table = block_tables + (long long)b * max_blocks;
    const long long kv_stride = (long long)num_kv_heads * D;
    const int vecs = D / 8;                                     // 16-byte vectors per row

    for (int i = tid; i < FP_BQ * vecs; i += blockDim.x) {
        const int r = i / vecs, c = (i % vecs) * 8;
        uint4 val = make_uint4(0, 0, 0, 0);
        if (r < rows_here)
            val = *reinterpret_cast<const uint4*>(q + ((long long)(q_first + q0 + r) * num_heads + head) * D + c);
        *reinterpret_cast<uint4*>(q_s + r * D + c) = val;
    }
    for (int i = tid; i < FP_BQ * D; i += blockDim.x) o_s[i] = 0.0f;

    // Two lanes per row: row rl of this warp, columns [half * FP_BK / 2, ...).
    const int rl = lane >> 1, half = lane & 1, r = warp * 16 + rl;
    const bool row_valid = r < rows_here;
    const int pos = pos0 + r;
    float m = -SHARDLINE_INF, l = 0.0f;

    for (int kb = k_lo; kb < k_hi; kb += FP_BK) {
        __syncthreads();  // every warp is done with the previous tile's K and V
        for (int i = tid; i < FP_BK * vecs; i += blockDim.x) {
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

        // S = Q K^T for this warp's 16 rows.
        for (int n = 0; n < FP_BK / 16; ++n) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            wmma::fill_fragment(acc, 0.0f);
            for (int kd = 0; kd < D / 16; ++kd) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bk;
                wmma::load_matrix_sync(a, q_s + warp * 16 * D + kd * 16, D);
                wmma::load_matrix_sync(bk, k_s + n * 16 * D + kd * 16, D);
                wmma::mma_sync(acc, a, bk, acc);
            }
            wmma::store_matrix_sync(s_s + warp * 16 * FP_BK + n * 16, acc, FP_BK, wmma::mem_row_major);
        }
        __syncwarp();

        // Online softmax of row r over this tile (two lanes per row).
        float* s_row = s_s + r * FP_BK;
        T* p_row = p_s + r * FP_BK;
        const int c0 = half * (FP_BK / 2);
        float tile_max = -SHARDLINE_INF;
        for (int c = c0; c < c0 + FP_BK / 2; ++c) {
            const int j = kb + c;
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
        for (int c = c0; c < c0 + FP_BK / 2; ++c) {
            const float p = none_yet ? 0.0f : expf(s_row[c] - new_m);
            p_row[c] = from_f<T>(p);
            sum += p;
        }
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        l = l * alpha + sum;
        m = new_m;
        for (int d = half * (D / 2); d < (half + 1) * (D / 2); ++d) o_s[r * D + d] *= alpha;
        __syncwarp();

        // O += P V for this warp's rows.
        for (int cd = 0; cd < D / 16; ++cd) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            wmma::load_matrix_sync(acc, o_s + warp * 16 * D + cd * 16, D, wmma::mem_row_major);
            for (int kk = 0; kk < FP_BK / 16; ++kk) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bv;
                wmma::load_matrix_sync(a, p_s + warp * 16 * FP_BK + kk * 16, FP_BK);
                wmma::load_matrix_sync(bv, v_s + kk * 16 * D + cd * 16, D);
                wmma::mma_sync(acc, a, bv, acc);
            }
            wmma::store_matrix_sync(o_s + warp * 16 * D + cd * 16, acc, D, wmma::mem_row_major);
        }
        __syncwarp();
    }

    if (row_valid) {
        T* out_row = out + ((long long)(q_first + q0 + r) * num_heads + head) * D;
        const float inv = 1.0f / l;
        for (int d = half * (D / 2); d < (half + 1) * (D / 2); ++d) out_row[d] = from_f<T>(o_s[r * D + d] * inv);
    }
}

// Causal grouped-query attention over a paged KV cache (a contiguous k, v
// is the one-block case), written for correctness and clarity, not speed:
// one block per (head, query token, key split), keys visited in chunks of
// ATTN_CHUNK with an online softmax. Prefill, chunked prefill and decode rows
// may share a launch; each finds its sequence in query_start_loc. With
// num_splits > 1 (few query rows: decode) each row's keys are cut into
// num_splits even ranges, one block each, whose partial (max, sum, weighted
// values) go to `partial` and attention_combine_kernel merges them.
//
// q [num_tokens, num_heads, head_dim]; caches [num_blocks, block_size,
// num_kv_heads, head_dim]. head_dim is at most 2 * ATTN_CHUNK. Launch with
// blockDim.x == ATTN_CHUNK. Reads only; allocates nothing.

#define ATTN_CHUNK 128

// Where key / value row j of one sequence sits in the cache.
struct KvRows {
    const int* table;  // the sequence's block table
    int block_size;
    long long stride;  // num_kv_heads * head_dim
    __device__ __forceinline__ long long offset(int j) const {
        return ((long long)table[j / block_size] * block_size + j % block_size) * stride;
    }
};

template <typename T>
__device__ __forceinline__ float chunk_score(const float* q_s, const T* k_head, const KvRows& rows, int base,
                                             int k_end, int head_dim, float scale) {
    // Each warp scores 32 consecutive keys (lanes split head_dim so reads
    // coalesce); thread `tid` ends up holding the score of key base + tid.
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float score = -SHARDLINE_INF;
    for (int kk = 0; kk < 32; ++kk) {
        const int j = base + warp * 32 + kk;
        if (j >= k_end) break;  // uniform across the warp
        const T* k_row = k_head + rows.offset(j);
        float part = 0.0f;
        for (int d = lane; d < head_dim; d += 32) part += q_s[d] * to_f(k_row[d]);
        part = warp_sum(part);
        if (lane == kk) score = part * scale;
    }
    return score;
}

struct QueryRow {
    int seq, num_q, seq_len, index;  // its sequence, that sequence's query count and length, its index there
};

__device__ QueryRow find_query_row(int token, int paged, const int* seq_lens, const int* query_start_loc,
                                   int num_seqs, int num_q, int seq_len) {
    if (!paged) return QueryRow{0, num_q, seq_len, token};
    int lo = 0, hi = num_seqs;  // the last sequence b with query_start_loc[b] <= token
    while (hi - lo > 1) {
        const int mid = (lo + hi) / 2;
        if (query_start_loc[mid] <= token) lo = mid; else hi = mid;
    }
    const int start = query_start_loc[lo];
    return QueryRow{lo, query_start_loc[lo + 1] - start, seq_lens[lo], token - start};
}

template <typename T>
__global__ void attention_kernel(const T* q, const T* k_cache, const T* v_cache, T* out, const int* block_tables,
                                 int max_blocks, int block_size, int paged, const int* seq_lens,
                                 const int* query_start_loc, int num_seqs, int num_q, int seq_len_single,
                                 int num_heads, int num_kv_heads, int head_dim, float scale, int window,
                                 int num_splits, float* partial) {
    pdl_begin();
    // paged == 0: one contiguous sequence of seq_len_single keys and num_q
    // queries (block_tables is a single 0, block_size == seq_len_single).
    // partial [num_tokens, num_heads, num_splits, head_dim + 2] when num_splits > 1.
    __shared__ float q_s[2 * ATTN_CHUNK];
    __shared__ float p_s[ATTN_CHUNK];
    const int head = blockIdx.x, token = blockIdx.y, split = blockIdx.z, tid = threadIdx.x;
    const long long q_offset = ((long long)token * num_heads + head) * head_dim;
    if (paged && token >= query_start_loc[num_seqs]) {  // a padding row past every request
        if (split == 0) for (int d = tid; d < head_dim; d += blockDim.x) out[q_offset + d] = from_f<T>(0.0f);
        return;
    }
    const QueryRow row = find_query_row(token, paged, seq_lens, query_start_loc, num_seqs, num_q, seq_len_single);
    const int kv_head = head / (num_heads / num_kv_heads);
    const int q_pos = row.seq_len - row.num_q + row.index;
    const int row_end = q_pos + 1;  // keys at positions <= q_pos
    const int row_start = window > 0 ? max(0, q_pos - window + 1) : 0;
    const int per_split = (row_end - row_start + num_splits - 1) / num_splits;
    const int k_start = row_start + split * per_split, k_end = min(row_end, k_start + per_split);
    const KvRows rows = {block_tables + (long long)row.seq * max_blocks, block_size,
                         (long long)num_kv_heads * head_dim};
    const T* k_head = k_cache + (long long)kv_head * head_dim;
    const T* v_head = v_cache + (long long)kv_head * head_dim;
    for (int d = tid; d < head_dim; d += blockDim.x) q_s[d] = to_f(q[q_offset + d]);
    __syncthreads();

    const int d0 = tid, d1 = tid + ATTN_CHUNK;  // the output dims this thread owns
    float m = -SHARDLINE_INF, l = 0.0f, acc0 = 0.0f, acc1 = 0.0f;
    for (int base = k_start; base < k_end; base += ATTN_CHUNK) {
        const float score = chunk_score(q_s, k_head, rows, base, k_end, head_dim, scale);
        const float new_m = fmaxf(m, block_max(score));  // finite: the chunk has a visible key
        const float p = expf(score - new_m);              // 0 for keys past k_end
        p_s[tid] = p;
        const float alpha = expf(m - new_m);              // 0 on the first chunk
        l = l * alpha + block_sum(p);                     // its syncs publish p_s
        acc0 *= alpha;
        acc1 *= alpha;
        const int n = min(ATTN_CHUNK, k_end - base);
#pragma unroll 4
        for (int jj = 0; jj < n; ++jj) {
            const float pj = p_s[jj];
            const T* v_row = v_head + rows.offset(base + jj);
            if (d0 < head_dim) acc0 += pj * to_f(v_row[d0]);
            if (d1 < head_dim) acc1 += pj * to_f(v_row[d1]);
        }
        m = new_m;
        __syncthreads();  // p_s is rewritten by the next chunk
    }
    if (num_splits > 1) {  // an empty range leaves m = -inf, l = 0: it weighs nothing in the merge
        float* slot = partial + (((long long)token * num_heads + head) * num_splits + split) * (head_dim + 2);
        if (d0 < head_dim) slot[d0] = acc0;
        if (d1 < head_dim) slot[d1] = acc1;
        if (tid == 0) { slot[head_dim] = m; slot[head_dim + 1] = l; }
        return;
    }
    if (d0 < head_dim) out[q_offset + d0] = from_f<T>(acc0 / l);
    if (d1 < head_dim) out[q_offset + d1] = from_f<T>(acc1 / l);
}

template <typename T>
__global__ void attention_combine_kernel(const float* partial, T* out, const int* query_start_loc, int num_seqs,
                                         int paged, int num_heads, int head_dim, int num_splits) {
    pdl_begin();
    // One block per (head, query token): out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s.
    const int head = blockIdx.x, token = blockIdx.y;
    if (paged && token >= query_start_loc[num_seqs]) return;  // the padding row is already zero
    const float* parts = partial + ((long long)token * num_heads + head) * num_splits * (head_dim + 2);
    float m = -SHARDLINE_INF;
    for (int s = 0; s < num_splits; ++s) m = fmaxf(m, parts[s * (head_dim + 2) + head_dim]);
    float l = 0.0f;
    for (int s = 0; s < num_splits; ++s) {
        const float ms = parts[s * (head_dim + 2) + head_dim];
        if (ms > -SHARDLINE_INF) l += expf(ms - m) * parts[s * (head_dim + 2) + head_dim + 1];
    }
    const long long o = ((long long)token * num_heads + head) * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float acc = 0.0f;
        for (int s = 0; s < num_splits; ++s) {
            const float ms = parts[s * (head_dim + 2) + head_dim];
            if (ms > -SHARDLINE_INF) acc += expf(ms - m) * parts[s * (head_dim + 2) + d];
        }
        out[o + d] = from_f<T>(acc / l);
    }
}

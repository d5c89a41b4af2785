// Elementwise and row-movement kernels: add, silu_and_mul, gelu, rope (and
// rope fused with the KV-cache write), row gather (embedding, index_rows),
// atomic row scatter-add, bias broadcast, KV-cache writes and block copies, and a
// graphed decode step's inputs read from pinned host memory.
//
// Storage type T is float, __half or __nv_bfloat16; arithmetic is float32 and
// each output is rounded once. These kernels never allocate and never
// synchronise with the host. The row-movement kernels are templated on an
// unsigned word W as wide as the element, so one instantiation serves every
// dtype.

template <typename T>
__global__ void add_kernel(const T* a, const T* b, T* out, long long n, long long num_b) {
    pdl_begin();
    // b repeats along a's leading dimensions (num_b divides n).
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        out[i] = from_f<T>(to_f(a[i]) + to_f(b[i % num_b]));
    }
}

template <typename T>
__global__ void silu_and_mul_kernel(const T* x, T* out, int inter) {
    pdl_begin();
    // x [rows, 2 * inter]: gate then up -> out [rows, inter]; blockIdx.x is the
    // row, (blockIdx.y, threadIdx.x) stride over its columns (no index division).
    const T* gate = x + blockIdx.x * 2LL * inter;
    T* dst = out + blockIdx.x * (long long)inter;
    for (int col = blockIdx.y * blockDim.x + threadIdx.x; col < inter; col += gridDim.y * blockDim.x) {
        const float g = to_f(gate[col]), up = to_f(gate[inter + col]);
        dst[col] = from_f<T>(silu_mul(g, up));
    }
}

template <typename T>
__global__ void silu_and_mul_vec_kernel(const T* x, T* out, int inter) {
    pdl_begin();
    // silu_and_mul_kernel for 16-bit storage, inter % 8 == 0 and 16-byte aligned
    // rows: 8 columns a thread per step, in 16-byte loads and stores.
    const int vecs = inter / 8;
    const uint4* gate = reinterpret_cast<const uint4*>(x + blockIdx.x * 2LL * inter);
    uint4* dst = reinterpret_cast<uint4*>(out + blockIdx.x * (long long)inter);
    for (int v = blockIdx.y * blockDim.x + threadIdx.x; v < vecs; v += gridDim.y * blockDim.x) {
        float g[8], up[8];
        unpack8<T>(gate[v], g);
        unpack8<T>(gate[vecs + v], up);
#pragma unroll
        for (int i = 0; i < 8; ++i) g[i] = silu_mul(g[i], up[i]);
        dst[v] = pack8<T>(g);
    }
}

// silu_and_mul_vec_kernel of a GEMM's output over an RMSNorm whose weight the GEMM's columns hold
// (the norm folded): each row's gate and up times 1 / rms of `stream`'s row [rows, hidden] (hidden
// % 8 == 0, 16-byte aligned), which the block sums while its first gate and up vectors load.
template <typename T>
__global__ void silu_and_mul_rms_vec_kernel(const T* x, T* out, int inter, const T* stream, int hidden,
                                            float eps) {
    pdl_begin();
    const int vecs = inter / 8, first = blockIdx.y * blockDim.x + threadIdx.x;
    const uint4* gate = reinterpret_cast<const uint4*>(x + blockIdx.x * 2LL * inter);
    uint4* dst = reinterpret_cast<uint4*>(out + blockIdx.x * (long long)inter);
    uint4 gate0, up0;
    if (first < vecs) {
        gate0 = gate[first];
        up0 = gate[vecs + first];
    }
    const float scale = row_inv_rms<T, true>(stream + blockIdx.x * (long long)hidden, hidden, eps);
    for (int v = first; v < vecs; v += gridDim.y * blockDim.x) {
        float g[8], up[8];
        unpack8<T>(v == first ? gate0 : gate[v], g);
        unpack8<T>(v == first ? up0 : gate[vecs + v], up);
#pragma unroll
        for (int i = 0; i < 8; ++i) g[i] = silu_mul(g[i] * scale, up[i] * scale);
        dst[v] = pack8<T>(g);
    }
}

template <typename T>
__global__ void gelu_kernel(const T* x, T* out, long long n, int exact) {
    pdl_begin();
    const float tanh_c = 0.7978845608028654f;  // sqrt(2 / pi)
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const float v = to_f(x[i]);
        const float y = exact ? 0.5f * v * (1.0f + erff(v * 0.7071067811865476f))
                              : 0.5f * v * (1.0f + tanhf(tanh_c * (v + 0.044715f * v * v * v)));
        out[i] = from_f<T>(y);
    }
}

template <typename T>
__device__ __forceinline__ void rotate_half(const T* src, T* dst, const float* table, int half, int j,
                                            float scale = 1.0f) {
    // rotate-half on one (x1, x2) pair, each times scale: table is cos | sin for the token
    const float c = table[j], s = table[half + j];
    const float x1 = to_f(src[j]) * scale, x2 = to_f(src[half + j]) * scale;
    dst[j] = from_f<T>(x1 * c - x2 * s);
    dst[half + j] = from_f<T>(x2 * c + x1 * s);
}

template <typename T>
__global__ void __launch_bounds__(1024)
rope_kernel(const T* x, T* out, const long long* positions, const float* cos_sin, int num_heads, int head_dim) {
    pdl_begin();
    // One block per token. x, out [num_tokens, num_heads, head_dim];
    // cos_sin [max_positions, head_dim]: cos | sin.
    const int half = head_dim / 2;
    const long long row = blockIdx.x * (long long)num_heads * head_dim;
    const float* table = cos_sin + positions[blockIdx.x] * head_dim;
    for (int i = threadIdx.x; i < num_heads * half; i += blockDim.x) {
        const int head = i / half;
        rotate_half(x + row + head * head_dim, out + row + head * head_dim, table, half, i % half);
    }
}

// rotate_half on eight (x1, x2) pairs from column j (a multiple of 8): 16-byte loads and stores
// of 16-bit storage, the table's cos and sin in 16-byte loads; each element as rotate_half.
template <typename T>
__device__ __forceinline__ void rotate_half8(const T* src, T* dst, const float* table, int half, int j,
                                             float scale = 1.0f) {
    float x1[8], x2[8], y1[8], y2[8];
    unpack8<T>(*reinterpret_cast<const uint4*>(src + j), x1);
    unpack8<T>(*reinterpret_cast<const uint4*>(src + half + j), x2);
#pragma unroll
    for (int e = 0; e < 8; ++e) {
        x1[e] *= scale;
        x2[e] *= scale;
    }
    const float4* cos4 = reinterpret_cast<const float4*>(table + j);
    const float4* sin4 = reinterpret_cast<const float4*>(table + half + j);
    const float4 ca = cos4[0], cb = cos4[1], sa = sin4[0], sb = sin4[1];
    const float c[8] = {ca.x, ca.y, ca.z, ca.w, cb.x, cb.y, cb.z, cb.w};
    const float s[8] = {sa.x, sa.y, sa.z, sa.w, sb.x, sb.y, sb.z, sb.w};
#pragma unroll
    for (int e = 0; e < 8; ++e) {
        y1[e] = x1[e] * c[e] - x2[e] * s[e];
        y2[e] = x2[e] * c[e] + x1[e] * s[e];
    }
    *reinterpret_cast<uint4*>(dst + j) = pack8<T>(y1);
    *reinterpret_cast<uint4*>(dst + half + j) = pack8<T>(y2);
}

// What a thread of rope_write_kv_kernel moves at a time: PAIRS rotate-half pairs from column j
// (rotate_half, or rotate_half8 for 16-bit storage), and v in Word pieces (T, or 16 bytes) of
// WIDTH elements, each times a scale where one is given.
template <typename T, int PAIRS> struct RopeStep {
    using Word = T;
    static constexpr int WIDTH = 1;
    static __device__ __forceinline__ void rotate(const T* src, T* dst, const float* table, int half, int j,
                                                  float scale) {
        rotate_half(src, dst, table, half, j, scale);
    }
    static __device__ __forceinline__ Word scaled(Word w, float scale) { return from_f<T>(to_f(w) * scale); }
};
template <typename T> struct RopeStep<T, 8> {
    using Word = uint4;
    static constexpr int WIDTH = 8;
    static __device__ __forceinline__ void rotate(const T* src, T* dst, const float* table, int half, int j,
                                                  float scale) {
        rotate_half8(src, dst, table, half, j, scale);
    }
    static __device__ __forceinline__ Word scaled(Word w, float scale) {
        float f[8];
        unpack8<T>(w, f);
#pragma unroll
        for (int i = 0; i < 8; ++i) f[i] *= scale;
        return pack8<T>(f);
    }
};

template <typename T, int PAIRS>
__global__ void __launch_bounds__(1024)
rope_write_kv_kernel(const T* q, const T* k, const T* v, T* q_out, T* k_cache, T* v_cache,
                     const long long* positions, const float* cos_sin, const long long* slots, long long num_slots,
                     int num_heads, int num_kv_heads, int head_dim, long long q_stride, long long k_stride,
                     long long v_stride, const T* stream, int hidden, float eps) {
    pdl_begin();
    // One block per token: rope on q (into q_out, contiguous) and on k
    // (straight into its cache slot), v copied to its slot. Slots out of
    // range are skipped. Token t's heads of q, k, v start at t * *_stride
    // (views of one QKV projection's columns need no copy). PAIRS = 8 (16-bit
    // storage, head_dim % 16 == 0, 16-byte aligned rows, token strides and
    // table): eight pairs a thread in 16-byte loads and stores. With a stream
    // [tokens, hidden] (a QKV projection whose columns hold the RMSNorm's weight
    // before it), q, k and v are first scaled by 1 / rms of the token's row of it
    // (row_inv_rms; 16-byte reads where PAIRS = 8).
    using Step = RopeStep<T, PAIRS>;
    using Word = typename Step::Word;
    const int half = head_dim / 2, steps = half / PAIRS, kv_width = num_kv_heads * head_dim;
    const long long token = blockIdx.x, slot = slots[token];
    const bool store = slot >= 0 && slot < num_slots;
    const float* table = cos_sin + positions[token] * head_dim;
    const float scale = stream ? row_inv_rms<T, PAIRS == 8>(stream + token * hidden, hidden, eps) : 1.0f;
    for (int i = threadIdx.x; i < (num_heads + num_kv_heads) * steps; i += blockDim.x) {
        const int head = i / steps, j = (i % steps) * PAIRS;
        if (head < num_heads) {
            Step::rotate(q + token * q_stride + head * head_dim, q_out + (token * num_heads + head) * head_dim, table,
                         half, j, scale);
        } else if (store) {
            const int offset = (head - num_heads) * head_dim;
            Step::rotate(k + token * k_stride + offset, k_cache + slot * kv_width + offset, table, half, j, scale);
        }
    }
    const Word* v_src = reinterpret_cast<const Word*>(v + token * v_stride);
    Word* v_dst = reinterpret_cast<Word*>(v_cache + slot * kv_width);
    for (int i = threadIdx.x; store && i < kv_width / Step::WIDTH; i += blockDim.x) {
        v_dst[i] = stream ? Step::scaled(v_src[i], scale) : v_src[i];
    }
}

template <typename W>
__global__ void write_kv_kernel(const W* k, const W* v, W* k_cache, W* v_cache, const long long* slots,
                                long long num_slots, long long row_words) {
    pdl_begin();
    // One block per token: its K/V rows to its cache slot (skipped when out of range).
    const long long slot = slots[blockIdx.x];
    if (slot < 0 || slot >= num_slots) return;
    for (long long i = threadIdx.x; i < row_words; i += blockDim.x) {
        k_cache[slot * row_words + i] = k[blockIdx.x * row_words + i];
        v_cache[slot * row_words + i] = v[blockIdx.x * row_words + i];
    }
}

template <typename W>
__global__ void copy_blocks_kernel(W* k_cache, W* v_cache, const int* copies, long long num_blocks,
                                   long long block_words) {
    pdl_begin();
    // blockIdx.x: copy index into copies [C, 2] (src, dst); blockIdx.y: 0 k, 1 v.
    const long long src = copies[2 * blockIdx.x], dst = copies[2 * blockIdx.x + 1];
    if (src < 0 || src >= num_blocks || dst < 0 || dst >= num_blocks) return;
    W* cache = blockIdx.y == 0 ? k_cache : v_cache;
    for (long long i = threadIdx.x; i < block_words; i += blockDim.x) {
        cache[dst * block_words + i] = cache[src * block_words + i];
    }
}

template <typename W>
__global__ void gather_cache_rows_kernel(const unsigned long long* caches, const long long* slots, W* out,
                                         long long num_slots_out, long long cache_slots, long long row_words) {
    pdl_begin();
    // blockIdx.x: index into slots; blockIdx.y: cache (all layers' K, then V, in one launch).
    // out [caches, slots, row]; a slot out of range gives a zero row.
    const long long slot = slots[blockIdx.x];
    const bool valid = slot >= 0 && slot < cache_slots;
    const W* src = reinterpret_cast<const W*>(caches[blockIdx.y]) + slot * row_words;
    W* dst = out + (blockIdx.y * num_slots_out + blockIdx.x) * row_words;
    for (long long i = threadIdx.x; i < row_words; i += blockDim.x) {
        dst[i] = valid ? src[i] : (W)0;
    }
}

template <typename W>
__global__ void scatter_cache_rows_kernel(const unsigned long long* caches, const long long* slots, const W* rows,
                                          long long num_slots_in, long long cache_slots, long long row_words) {
    pdl_begin();
    // The inverse of gather_cache_rows_kernel; a slot out of range is skipped.
    const long long slot = slots[blockIdx.x];
    if (slot < 0 || slot >= cache_slots) return;
    W* dst = reinterpret_cast<W*>(caches[blockIdx.y]) + slot * row_words;
    const W* src = rows + (blockIdx.y * num_slots_in + blockIdx.x) * row_words;
    for (long long i = threadIdx.x; i < row_words; i += blockDim.x) {
        dst[i] = src[i];
    }
}

#define GATHER_LOADS 4
template <typename W>
__global__ void gather_rows_kernel(const W* src, W* out, const long long* rows, long long num_src_rows,
                                   long long row_words) {
    pdl_begin();
    // One block per output row; W is an unsigned word (the widest that tiles a row), so one
    // kernel serves every dtype. A thread loads GATHER_LOADS words before storing any: a load
    // after a store waits for it (src and out may alias, for all the compiler knows). Ids out
    // of range give a zero row: the device cannot raise, and the host must not sync to check.
    const long long r = rows[blockIdx.x];
    const bool valid = r >= 0 && r < num_src_rows;
    W* dst = out + blockIdx.x * row_words;
    for (long long i0 = threadIdx.x; i0 < row_words; i0 += GATHER_LOADS * (long long)blockDim.x) {
        W w[GATHER_LOADS];
#pragma unroll
        for (int u = 0; u < GATHER_LOADS; ++u) {
            const long long i = i0 + u * (long long)blockDim.x;
            w[u] = valid && i < row_words ? src[r * row_words + i] : (W)0;
        }
#pragma unroll
        for (int u = 0; u < GATHER_LOADS; ++u) {
            const long long i = i0 + u * (long long)blockDim.x;
            if (i < row_words) dst[i] = w[u];
        }
    }
}

template <typename T>
__global__ void __launch_bounds__(1024)
scatter_add_rows_kernel(T* out, const long long* rows, const T* src, const float* scale,
                        long long num_out_rows, int hidden) {
    pdl_begin();
    // One block per source row: out[rows[i]] += scale[i] * src[i]. Rows may
    // repeat, hence the atomics; rows out of range are skipped.
    const long long r = rows[blockIdx.x];
    if (r < 0 || r >= num_out_rows) return;
    const float s = scale[blockIdx.x];
    const T* from = src + blockIdx.x * (long long)hidden;
    T* to = out + r * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        atomicAdd(to + i, from_f<T>(to_f(from[i]) * s));
    }
}

template <typename T>
__global__ void fill_rows_kernel(const T* row, T* out, long long num_rows, int width) {
    pdl_begin();
    // out [num_rows, width] = row [width] broadcast (the bias before a GEMM
    // that accumulates onto it).
    const long long n = num_rows * width;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        out[i] = row[i % width];
    }
}

// A captured decode step's inputs, read by the step itself from pinned host memory, so no copy
// engine works (and waits) between two replays (worker/cuda_graphs.py: a graph a staging slot, each
// reading its own). `slot` is laid out as the step's device buffer `dst`, in 16-byte units: a
// header of int64 words (0: the previous step's sampled tokens on the device, int32; 2: the
// block-table columns in use, 0 or more than table_width meaning all), ..., and last the block
// tables, `rows` rows of table_width int32 (a multiple of 4) from byte table_at.
// - Every unit before the tables is copied but those of the int64 token ids (tokens_at, `rows` of
//   them), which each row takes from the slot, or from the previous step's tokens where its source
//   (int32 at sources_at) is >= 0: the pending tokens of a step decoded ahead.
// - Of the tables only the columns in use are copied, to the next multiple of 4 (a 128k-token
//   model's rows are 32 KB, of which a short context uses a few hundred bytes).
// Host memory is read with __ldcv: fetched again at every launch, never from a cache. One thread
// a block reads the header, its loads issued before the copy's: reads of one host line queue one
// behind another (on an H200, every warp of a 131 KB launch reading one took 270 us, one read a
// block of 8 blocks 19 us), so launch few, large blocks.
#define STAGE_THREADS 1024
__global__ void __launch_bounds__(STAGE_THREADS)
stage_decode_inputs_kernel(const uint4* slot, uint4* dst, long long tokens_at, long long sources_at, int rows,
                           long long table_at, int table_width) {
    pdl_begin();
    __shared__ long long header[2];   // words 0 and 2 of the slot
    long long previous_word = 0, columns_word = 0;
    if (threadIdx.x == 0) {
        previous_word = __ldcv(reinterpret_cast<const long long*>(slot));
        columns_word = __ldcv(reinterpret_cast<const long long*>(slot) + 2);
    }
    const long long token_lo = tokens_at / 16, token_hi = (tokens_at + 8LL * rows + 15) / 16;
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long first = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    for (long long i = first; i < table_at / 16; i += stride) {
        if (i < token_lo || i >= token_hi) dst[i] = __ldcv(slot + i);
    }
    if (threadIdx.x == 0) header[0] = previous_word, header[1] = columns_word;
    __syncthreads();
    const int* previous = reinterpret_cast<const int*>(header[0]);
    const int columns = header[1] < 1 || header[1] > table_width ? table_width : (int)header[1];
    const char* base = reinterpret_cast<const char*>(slot);
    for (long long i = first; i < rows; i += stride) {
        // both loaded at once: one round trip to the host, not two
        const int source = __ldcv(reinterpret_cast<const int*>(base + sources_at) + i);
        const long long staged = __ldcv(reinterpret_cast<const long long*>(base + tokens_at) + i);
        reinterpret_cast<long long*>(reinterpret_cast<char*>(dst) + tokens_at)[i] =
            source >= 0 ? (long long)previous[source] : staged;
    }
    // a row's first columns in 16-byte units (table_width is a multiple of 4)
    const long long row_units = table_width / 4, used_units = (columns + 3) / 4;
    for (long long i = first; i < (long long)rows * used_units; i += stride) {
        const long long at = table_at / 16 + i / used_units * row_units + i % used_units;
        dst[at] = __ldcv(slot + at);
    }
}

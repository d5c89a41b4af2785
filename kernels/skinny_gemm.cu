// Decode-sized GEMMs: y[m, n] = sum_k x[m, k] w[n, k] (+ y[m, n] when
// accumulate, which adds a bias the caller filled in) for M <= 4 rows of x,
// bf16 or fp16 in, fp32 accumulate. Such a GEMM is one pass over the weight,
// so it should run at the memory's read rate: one warp per SG_ROWS output
// features, lanes striding over k in 16-byte vectors (a warp reads 512
// contiguous bytes of a weight row per step, streamed past L1 with
// __ldcs), x re-read through the read-only cache (it is small). Loops are
// unrolled so several loads are in flight per lane.
//
// gated: w is [2N, K], gate rows then up rows (a fused gate/up projection),
// and y[m, n] = silu(gate) * up, both rounded to T first, exactly as
// silu_and_mul_kernel computes it from the unfused GEMM's output (at the same
// K split). Each warp then owns one output feature and reads its gate and up rows.
//
// KS > 1 splits K over KS warps of a block (each owning the same output features), their
// sums merged in shared memory: more loads in flight when N is small for the GPU.
//
// Requires K % 8 == 0 and 16-byte aligned x, w rows (checked on the host).
// blockDim.x == SG_WARPS * 32.

#define SG_ROWS 2   // gated mode relies on it: a warp's gate row and up row
#define SG_WARPS 4   // not 8: more, smaller blocks read about 2% faster (bench/notes/RESULTS.md)
#define SG_PREFETCH 4

// The RMSNorm in front of the GEMM (norm_skinny_gemm_kernel), streamed: the warps read the
// norm's input with the weights, so nothing normalises the rows beforehand. RMSNorm(h) . w_n =
// inv_rms(h) * sum_k w[n, k] g[k] h[k] (g the norm's weight), so each warp sums h[k]^2 next to
// its dot products and scales its sums by 1 / sqrt(mean(h^2) + eps) at the end. h = x
// (+ residual, rounded to T, as rms_norm_vec_kernel rounds it); the first warp of tile 0 writes
// it to residual_out, which must not alias x or residual (other warps still read them).
template <typename T>
struct NormIn {
    const T* residual;   // nullptr: h = x
    const T* weight;     // g, [K]
    T* residual_out;
    float eps;
};

// RoPE and the KV-cache write after a QKV projection (skinny_gemm_rope_kernel): w's rows are
// the heads of q, then k, then v, head_dim each (bias-free). Each warp owns one rotate-half
// pair of a head, rows n0 and n0 + head_dim / 2, and does what rope_write_kv_kernel does with
// them once rounded to T: q rotated into q_out [M, num_heads, head_dim], k rotated and v copied
// into the token's cache slot (skipped when out of range), the same float math.
template <typename T>
struct RopeOut {
    T* q_out;
    T* k_cache;
    T* v_cache;
    const long long* positions;   // [M]
    const float* cos_sin;         // [max_positions, head_dim]: cos | sin
    const long long* slots;       // [M]
    long long num_slots;
    int num_heads, num_kv_heads, head_dim;
};

template <typename T, int M>
__device__ __forceinline__ void rope_store(const RopeOut<T>& rope, int pair, const float (&acc)[SG_ROWS][M]) {
    const int half = rope.head_dim / 2, head = pair / half, i = pair % half;
    const int kv_width = rope.num_kv_heads * rope.head_dim;
#pragma unroll
    for (int m = 0; m < M; ++m) {
        const float x1 = round_to<T>(acc[0][m]), x2 = round_to<T>(acc[1][m]);
        const long long slot = rope.slots[m];
        if (head >= rope.num_heads && (slot < 0 || slot >= rope.num_slots)) continue;   // k, v of a padding row
        if (head < rope.num_heads + rope.num_kv_heads) {
            const float* table = rope.cos_sin + rope.positions[m] * rope.head_dim;
            const float c = table[i], s = table[half + i];
            T* dst = head < rope.num_heads ? rope.q_out + ((long long)m * rope.num_heads + head) * rope.head_dim
                                           : rope.k_cache + slot * kv_width + (head - rope.num_heads) * rope.head_dim;
            dst[i] = from_f<T>(x1 * c - x2 * s);
            dst[half + i] = from_f<T>(x2 * c + x1 * s);
        } else {
            T* dst = rope.v_cache + slot * kv_width + (head - rope.num_heads - rope.num_kv_heads) * rope.head_dim;
            dst[i] = from_f<T>(x1);
            dst[half + i] = from_f<T>(x2);
        }
    }
}

// A warp's work on one 16-byte step v of its rows: acc[r][m] += w_r[v] . x_m[v] (NORM: with
// x_m[v] = h_m[v] g[v], and sum_sq[m] += h_m[v] . h_m[v]).
template <typename T, int M, bool NORM>
__device__ __forceinline__ void skinny_step(const uint4* xv, const NormIn<T>& norm, bool writes_residual, int vecs,
                                            int v, const uint4 (&w)[SG_ROWS], int rows, float (&acc)[SG_ROWS][M],
                                            float (&sum_sq)[M]) {
    float xf[M][8];
    float g[8];
    if (NORM) unpack8<T>(__ldg(reinterpret_cast<const uint4*>(norm.weight) + v), g);
#pragma unroll
    for (int m = 0; m < M; ++m) {
        const long long at = (long long)m * vecs + v;
        unpack8<T>(__ldg(xv + at), xf[m]);
        if (NORM) {
            if (norm.residual) {
                float r[8];
                unpack8<T>(__ldg(reinterpret_cast<const uint4*>(norm.residual) + at), r);
#pragma unroll
                for (int i = 0; i < 8; ++i) xf[m][i] = round_to<T>(xf[m][i] + r[i]);
                if (writes_residual) reinterpret_cast<uint4*>(norm.residual_out)[at] = pack8<T>(xf[m]);
            }
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                sum_sq[m] = fmaf(xf[m][i], xf[m][i], sum_sq[m]);
                xf[m][i] *= g[i];
            }
        }
    }
#pragma unroll
    for (int r = 0; r < SG_ROWS; ++r) {
        if (r < rows) {
            float wf[8];
            unpack8<T>(w[r], wf);
#pragma unroll
            for (int m = 0; m < M; ++m)
#pragma unroll
                for (int i = 0; i < 8; ++i) acc[r][m] = fmaf(wf[i], xf[m][i], acc[r][m]);
        }
    }
}

// KS > 1: the KS warps that own the same features add their sums (lane 0's), in K order,
// into the first of them (NORM: their sums of squares too). Every thread of the block calls it
// (it synchronises); true for the warps that then hold their features' whole sums. LOOP: a
// block's tiles alternate between two buffers (round: its tile count so far), so a warp may
// write the next tile's sums while another still reads this one's: the barrier of the next
// merge keeps it from getting further ahead.
template <int M, int KS, bool NORM, bool LOOP>
__device__ __forceinline__ bool skinny_merge_k_parts(float (&acc)[SG_ROWS][M], float (&sum_sq)[M], int lane, int ks,
                                                     int rows, int round) {
    __shared__ float parts[LOOP ? 2 : 1][SG_WARPS][SG_ROWS + NORM][M];
    float(&mine)[SG_WARPS][SG_ROWS + NORM][M] = parts[LOOP ? round & 1 : 0];
    const int warp = threadIdx.x >> 5;
    if (lane == 0)
#pragma unroll
        for (int m = 0; m < M; ++m) {
#pragma unroll
            for (int r = 0; r < SG_ROWS; ++r) mine[warp][r][m] = acc[r][m];
            if (NORM) mine[warp][SG_ROWS][m] = sum_sq[m];
        }
    __syncthreads();
    if (ks != 0 || rows == 0) return false;
#pragma unroll
    for (int j = 1; j < KS; ++j)
#pragma unroll
        for (int m = 0; m < M; ++m) {
#pragma unroll
            for (int r = 0; r < SG_ROWS; ++r) acc[r][m] += mine[warp + j][r][m];
            if (NORM) sum_sq[m] += mine[warp + j][SG_ROWS][m];
        }
    return true;
}

// Where one warp's weights of a tile lie: its first output feature n0 and its rows (0-2) of
// the weight, `row_vecs` 16-byte vectors apart (gated N, the up row; ROPE head_dim / 2, a
// rotate-half pair; else 1), over vectors [v_lo, v_hi) of K (its share of the K split).
struct SkinnyRows {
    int n0, rows, v_lo, v_hi;
    long long row_vecs;
    const uint4* wv;
};

template <typename T, int KS, bool ROPE>
__device__ __forceinline__ SkinnyRows skinny_rows(const T* w, int N, int K, int gated, int half, int tile) {
    const int ks = (threadIdx.x >> 5) % KS, vecs = K / 8;
    const int warp = tile * (SG_WARPS / KS) + (threadIdx.x >> 5) / KS;   // this warp's output features
    SkinnyRows s;
    s.v_lo = (int)((long long)vecs * ks / KS);
    s.v_hi = (int)((long long)vecs * (ks + 1) / KS);
    s.n0 = gated ? warp : ROPE ? warp / half * (2 * half) + warp % half : warp * SG_ROWS;
    s.rows = gated || ROPE ? (s.n0 < N ? 2 : 0) : max(0, min(SG_ROWS, N - s.n0));
    s.row_vecs = (long long)(gated ? N : half) * vecs;
    s.wv = reinterpret_cast<const uint4*>(w + (long long)max(0, min(s.n0, N - 1)) * K);
    return s;
}

// A warp's first SG_PREFETCH steps of its weight rows, loaded ahead: before the dependent-launch
// wait (the weight is no kernel's output), and in the looped kernels while the tile before ends.
__device__ __forceinline__ void skinny_prefetch(const SkinnyRows& s, int lane, uint4 (&first)[SG_PREFETCH][SG_ROWS]) {
#pragma unroll
    for (int p = 0; p < SG_PREFETCH; ++p)
#pragma unroll
        for (int r = 0; r < SG_ROWS; ++r)
            if (r < s.rows && s.v_lo + lane + 32 * p < s.v_hi)
                first[p][r] = __ldcs(s.wv + r * s.row_vecs + s.v_lo + lane + 32 * p);
}

// A warp's sums over its rows: acc[r][m] = w_r . x_m from its first SG_PREFETCH steps (loaded
// already) and the rest of [v_lo, v_hi), a lane every 32nd step (NORM: sum_sq too, see skinny_step).
template <typename T, int M, bool NORM>
__device__ __forceinline__ void skinny_sums(const uint4* xv, const NormIn<T>& norm, bool writes_residual, int vecs,
                                            int v_lo, int v_hi, int lane, const uint4 (&first)[SG_PREFETCH][SG_ROWS],
                                            const uint4* wv, long long row_vecs, int rows, float (&acc)[SG_ROWS][M],
                                            float (&sum_sq)[M]) {
#pragma unroll
    for (int m = 0; m < M; ++m) {
        sum_sq[m] = 0.0f;
#pragma unroll
        for (int r = 0; r < SG_ROWS; ++r) acc[r][m] = 0.0f;
    }
#pragma unroll
    for (int p = 0; p < SG_PREFETCH; ++p)
        if (v_lo + lane + 32 * p < v_hi)
            skinny_step<T, M, NORM>(xv, norm, writes_residual, vecs, v_lo + lane + 32 * p, first[p], rows, acc, sum_sq);

#pragma unroll 4
    for (int v = v_lo + lane + 32 * SG_PREFETCH; v < v_hi; v += 32) {
        uint4 wr[SG_ROWS];
#pragma unroll
        for (int r = 0; r < SG_ROWS; ++r)
            if (r < rows) wr[r] = __ldcs(wv + r * row_vecs + v);
        skinny_step<T, M, NORM>(xv, norm, writes_residual, vecs, v, wr, rows, acc, sum_sq);
    }
}

// The end of a tile: each warp's lanes' sums added up, the K split's warps merged, then its
// outputs written (NORM scaled by the inverse RMS; ROPE where RopeOut says; gated silu(gate) * up).
template <typename T, int M, int KS, bool NORM, bool ROPE, bool LOOP>
__device__ __forceinline__ void skinny_store(float (&acc)[SG_ROWS][M], float (&sum_sq)[M], int lane, int ks, int rows,
                                             int round, int warp, int n0, const NormIn<T>& norm,
                                             const RopeOut<T>& rope, T* y, int N, int K, int accumulate, int gated) {
#pragma unroll
    for (int m = 0; m < M; ++m) {
        if (NORM) sum_sq[m] = warp_sum(sum_sq[m]);
#pragma unroll
        for (int r = 0; r < SG_ROWS; ++r) acc[r][m] = warp_sum(acc[r][m]);
    }
    if (KS > 1 && !skinny_merge_k_parts<M, KS, NORM, LOOP>(acc, sum_sq, lane, ks, rows, round)) return;
    if (NORM)
#pragma unroll
        for (int m = 0; m < M; ++m) {
            const float inv_rms = 1.0f / sqrtf(sum_sq[m] / K + norm.eps);
#pragma unroll
            for (int r = 0; r < SG_ROWS; ++r) acc[r][m] *= inv_rms;
        }
    if (ROPE) {
        if (lane == 0) rope_store<T, M>(rope, warp, acc);
    } else if (lane == 0 && gated) {
        for (int m = 0; m < M; ++m) {
            const float g = round_to<T>(acc[0][m]), up = round_to<T>(acc[1][m]);
            y[(long long)m * N + n0] = from_f<T>(silu_mul(g, up));
        }
    } else if (lane == 0) {
        for (int r = 0; r < rows; ++r)
            for (int m = 0; m < M; ++m) {
                T* out = y + (long long)m * N + n0 + r;
                *out = from_f<T>(acc[r][m] + (accumulate ? to_f(*out) : 0.0f));
            }
    }
}

// One tile of output features (SG_WARPS / KS warps' worth), the block's round-th. NORM: x is
// the RMSNorm's input (see NormIn) and the GEMM reads its output, K = the norm's width. ROPE: y
// unused, the outputs go where RopeOut says (not gated, no accumulate).
template <typename T, int M, int KS, bool NORM, bool ROPE, bool LOOP>
__device__ __forceinline__ void skinny_tile(const T* x, const NormIn<T>& norm, const RopeOut<T>& rope, const T* w,
                                            T* y, int N, int K, int accumulate, int gated, int tile, int round) {
    const int lane = threadIdx.x & 31, ks = (threadIdx.x >> 5) % KS, vecs = K / 8;
    const int warp = tile * (SG_WARPS / KS) + (threadIdx.x >> 5) / KS;   // this warp's output features
    const int v_lo = (int)((long long)vecs * ks / KS), v_hi = (int)((long long)vecs * (ks + 1) / KS);
    // This warp's first output feature, and its rows' distance: gated N (gate, up), ROPE
    // head_dim / 2 (a rotate-half pair), else 1. skinny_rows computes the same for the ahead
    // kernels and must stay in step (written out here, these kernels keep their SASS).
    const int half = ROPE ? rope.head_dim / 2 : 1;
    const int n0 = gated ? warp : ROPE ? warp / half * rope.head_dim + warp % half : warp * SG_ROWS;
    const int rows = gated || ROPE ? (n0 < N ? 2 : 0) : max(0, min(SG_ROWS, N - n0));
    const bool writes_residual = NORM && warp == 0;   // rows > 0: N >= 1
    const long long row_vecs = (long long)(gated ? N : half) * vecs;   // weight row r of the warp: n0 + r * that
    const uint4* xv = reinterpret_cast<const uint4*>(x);
    const uint4* wv = reinterpret_cast<const uint4*>(w + (long long)max(0, min(n0, N - 1)) * K);
    // The weight is no kernel's output: its first SG_PREFETCH steps are loaded before
    // waiting for the kernel before (dependent launch), overlapping that kernel's tail (in a
    // block's later tiles the wait has returned already).
    uint4 first[SG_PREFETCH][SG_ROWS];
#pragma unroll
    for (int p = 0; p < SG_PREFETCH; ++p)
#pragma unroll
        for (int r = 0; r < SG_ROWS; ++r)
            if (r < rows && v_lo + lane + 32 * p < v_hi) first[p][r] = __ldcs(wv + r * row_vecs + v_lo + lane + 32 * p);
    pdl_begin();
    if (KS == 1 && rows == 0) return;  // the whole warp (KS > 1: its block's merge needs it)
    float acc[SG_ROWS][M], sum_sq[M];
    skinny_sums<T, M, NORM>(xv, norm, writes_residual, vecs, v_lo, v_hi, lane, first, wv, row_vecs, rows, acc, sum_sq);
    skinny_store<T, M, KS, NORM, ROPE, LOOP>(acc, sum_sq, lane, ks, rows, round, warp, n0, norm, rope, y, N, K,
                                             accumulate, gated);
}

// skinny_tile in a looped kernel that loads each block's next tile while its last one ends
// (SkinnyAhead): `first` holds this tile's first steps, loaded while the tile before ended (the
// block's first tile: before the dependent-launch wait), and where next >= 0 (the block's next
// tile) gets that tile's once this tile's sums are done, in flight during its warp reductions,
// K-split merge and stores.
template <typename T, int M, int KS, bool NORM, bool ROPE>
__device__ __forceinline__ void skinny_tile_ahead(const T* x, const NormIn<T>& norm, const RopeOut<T>& rope,
                                                  const T* w, T* y, int N, int K, int accumulate, int gated, int tile,
                                                  int round, uint4 (&first)[SG_PREFETCH][SG_ROWS], int next) {
    const int lane = threadIdx.x & 31, ks = (threadIdx.x >> 5) % KS, vecs = K / 8;
    const int warp = tile * (SG_WARPS / KS) + (threadIdx.x >> 5) / KS;
    const int half = ROPE ? rope.head_dim / 2 : 1;
    const SkinnyRows s = skinny_rows<T, KS, ROPE>(w, N, K, gated, half, tile);
    const bool writes_residual = NORM && warp == 0;
    // KS == 1: a warp without rows has none in a later tile either (n0 only grows)
    if (KS == 1 && s.rows == 0) return;
    float acc[SG_ROWS][M], sum_sq[M];
    skinny_sums<T, M, NORM>(reinterpret_cast<const uint4*>(x), norm, writes_residual, vecs, s.v_lo, s.v_hi, lane,
                            first, s.wv, s.row_vecs, s.rows, acc, sum_sq);
    if (next >= 0) skinny_prefetch(skinny_rows<T, KS, ROPE>(w, N, K, gated, half, next), lane, first);
    skinny_store<T, M, KS, NORM, ROPE, true>(acc, sum_sq, lane, ks, s.rows, round, warp, s.n0, norm, rope, y, N, K,
                                             accumulate, gated);
}

// Whether the looped kernels of M rows load a block's next tile while its last one ends
// (skinny_tile_ahead): at one row, where Llama-3-8B's decode step on an H200 took 4.51 ms
// against 4.58 (bench.decode_ab). From 2 rows on the engine's steps swung both ways (4 rows
// 6.05 -> 6.85 ms, 2 rows 4.84 -> 4.69 at as many blocks as fit but 6.1 at 4 an SM), so there
// each tile loads its own first steps when it starts.
template <int M>
struct SkinnyAhead {
    static constexpr bool on = M == 1;
};

// The launch's tiles: one a block (the grid _skinny_tiles counts), or LOOP (the *_looped
// kernels, CudaOps.skinny_blocks_per_sm) block b takes tiles b, b + gridDim.x, ..., so the whole
// GEMM is resident from its start. A tile holds SG_WARPS / KS warps' output features (gated: one
// a warp; ROPE: N counts weight rows, two a warp). The loop costs registers, so the one-tile
// kernels keep their own code.
template <typename T, int M, int KS, bool NORM, bool ROPE, bool LOOP>
__device__ __forceinline__ void skinny_tiles(const T* x, const NormIn<T>& norm, const RopeOut<T>& rope, const T* w,
                                             T* y, int N, int K, int accumulate, int gated) {
    if (!LOOP) {
        skinny_tile<T, M, KS, NORM, ROPE, false>(x, norm, rope, w, y, N, K, accumulate, gated, blockIdx.x, 0);
        return;
    }
    const int per_tile = (gated ? 1 : SG_ROWS) * (SG_WARPS / KS);
    if (!SkinnyAhead<M>::on) {
        const int tiles = (N + per_tile - 1) / per_tile;
        int round = 0;
        for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x, ++round)
            skinny_tile<T, M, KS, NORM, ROPE, true>(x, norm, rope, w, y, N, K, accumulate, gated, tile, round);
        return;
    }
    uint4 first[SG_PREFETCH][SG_ROWS];
    skinny_prefetch(skinny_rows<T, KS, ROPE>(w, N, K, gated, ROPE ? rope.head_dim / 2 : 1, blockIdx.x),
                    threadIdx.x & 31, first);
    pdl_begin();
    const int tiles = (N + per_tile - 1) / per_tile;
    int round = 0;
    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x, ++round) {
        const int next = tile + gridDim.x < tiles ? tile + gridDim.x : -1;
        skinny_tile_ahead<T, M, KS, NORM, ROPE>(x, norm, rope, w, y, N, K, accumulate, gated, tile, round, first, next);
    }
}

template <typename T, int M, int KS>
__global__ void skinny_gemm_kernel(const T* x, const T* w, T* y, int N, int K, int accumulate, int gated) {
    skinny_tiles<T, M, KS, false, false, false>(x, NormIn<T>{}, RopeOut<T>{}, w, y, N, K, accumulate, gated);
}

template <typename T, int M, int KS>
__global__ void skinny_gemm_looped_kernel(const T* x, const T* w, T* y, int N, int K, int accumulate, int gated) {
    skinny_tiles<T, M, KS, false, false, true>(x, NormIn<T>{}, RopeOut<T>{}, w, y, N, K, accumulate, gated);
}

// y = linear(rms_norm(x (+ residual), norm_weight), w) in one launch, the norm streamed with
// the GEMM (NormIn).
template <typename T, int M, int KS>
__global__ void norm_skinny_gemm_kernel(const T* x, const T* residual, const T* norm_weight, T* residual_out,
                                        int has_residual, float eps, const T* w, T* y, int N, int K, int accumulate,
                                        int gated) {
    const NormIn<T> norm{has_residual ? residual : nullptr, norm_weight, residual_out, eps};
    skinny_tiles<T, M, KS, true, false, false>(x, norm, RopeOut<T>{}, w, y, N, K, accumulate, gated);
}

// The QKV projection with RoPE and the KV-cache write (RopeOut): skinny_gemm_rope_kernel from
// the normalised rows x, norm_skinny_gemm_rope_kernel with the RMSNorm before it (NormIn).
#define SG_ROPE_PARAMS                                                                                         \
    T *q_out, T *k_cache, T *v_cache, const long long *positions, const float *cos_sin, const long long *slots, \
        long long num_slots, int num_heads, int num_kv_heads, int head_dim
#define SG_ROPE_ARGS q_out, k_cache, v_cache, positions, cos_sin, slots, num_slots, num_heads, num_kv_heads, head_dim

template <typename T, int M, int KS>
__global__ void skinny_gemm_rope_kernel(const T* x, const T* w, int N, int K, SG_ROPE_PARAMS) {
    skinny_tiles<T, M, KS, false, true, false>(x, NormIn<T>{}, RopeOut<T>{SG_ROPE_ARGS}, w, nullptr, N, K, 0, 0);
}

template <typename T, int M, int KS>
__global__ void skinny_gemm_rope_looped_kernel(const T* x, const T* w, int N, int K, SG_ROPE_PARAMS) {
    skinny_tiles<T, M, KS, false, true, true>(x, NormIn<T>{}, RopeOut<T>{SG_ROPE_ARGS}, w, nullptr, N, K, 0, 0);
}

template <typename T, int M, int KS>
__global__ void norm_skinny_gemm_rope_kernel(const T* x, const T* residual, const T* norm_weight, T* residual_out,
                                             int has_residual, float eps, const T* w, int N, int K, SG_ROPE_PARAMS) {
    const NormIn<T> norm{has_residual ? residual : nullptr, norm_weight, residual_out, eps};
    skinny_tiles<T, M, KS, true, true, false>(x, norm, RopeOut<T>{SG_ROPE_ARGS}, w, nullptr, N, K, 0, 0);
}

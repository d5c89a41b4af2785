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

// A warp's work on one 16-byte step v of its rows: acc[r][m] += w_r[v] . x_m[v].
// XS: x lies in shared memory (the fused norm's output), else in global memory.
template <typename T, int M, bool XS>
__device__ __forceinline__ void skinny_step(const uint4* xv, int vecs, int v, const uint4 (&w)[SG_ROWS], int rows,
                                            float (&acc)[SG_ROWS][M]) {
    float xf[M][8];
#pragma unroll
    for (int m = 0; m < M; ++m) {
        const long long at = (long long)m * vecs + v;
        unpack8<T>(XS ? xv[at] : __ldg(xv + at), xf[m]);
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
// into the first of them. Every thread of the block calls it (it synchronises); true for
// the warps that then hold their features' whole sums.
template <int M, int KS>
__device__ __forceinline__ bool skinny_merge_k_parts(float (&acc)[SG_ROWS][M], int lane, int ks, int rows) {
    __shared__ float parts[SG_WARPS][SG_ROWS][M];
    if (lane == 0)
#pragma unroll
        for (int r = 0; r < SG_ROWS; ++r)
#pragma unroll
            for (int m = 0; m < M; ++m) parts[threadIdx.x >> 5][r][m] = acc[r][m];
    __syncthreads();
    if (ks != 0 || rows == 0) return false;
#pragma unroll
    for (int j = 1; j < KS; ++j)
#pragma unroll
        for (int r = 0; r < SG_ROWS; ++r)
#pragma unroll
            for (int m = 0; m < M; ++m) acc[r][m] += parts[(threadIdx.x >> 5) + j][r][m];
    return true;
}

// One tile of output features (SG_WARPS / KS warps' worth): the block's part of the launch.
// wait() runs once the tile's first weights are on their way, before x is read: the
// dependent-launch wait, and the fused norm's prologue (x then in shared memory, XS).
template <typename T, int M, int KS, bool XS, typename Wait>
__device__ __forceinline__ void skinny_tile(const T* x, const T* w, T* y, int N, int K, int accumulate, int gated,
                                            int tile, Wait wait) {
    const int lane = threadIdx.x & 31, ks = (threadIdx.x >> 5) % KS, vecs = K / 8;
    const int warp = tile * (SG_WARPS / KS) + (threadIdx.x >> 5) / KS;   // this warp's output features
    const int v_lo = (int)((long long)vecs * ks / KS), v_hi = (int)((long long)vecs * (ks + 1) / KS);
    const int n0 = gated ? warp : warp * SG_ROWS;   // this warp's first output feature
    const int rows = gated ? (n0 < N ? 2 : 0) : max(0, min(SG_ROWS, N - n0));
    const long long row_vecs = gated ? (long long)N * vecs : vecs;   // weight row r of the warp is n0 + r (* N)
    const uint4* xv = reinterpret_cast<const uint4*>(x);
    const uint4* wv = reinterpret_cast<const uint4*>(w + (long long)max(0, min(n0, N - 1)) * K);
    // The weight is no kernel's output: its first SG_PREFETCH steps are loaded before
    // waiting for the kernel before (dependent launch), overlapping that kernel's tail.
    uint4 first[SG_PREFETCH][SG_ROWS];
#pragma unroll
    for (int p = 0; p < SG_PREFETCH; ++p)
#pragma unroll
        for (int r = 0; r < SG_ROWS; ++r)
            if (r < rows && v_lo + lane + 32 * p < v_hi) first[p][r] = __ldcs(wv + r * row_vecs + v_lo + lane + 32 * p);
    wait();
    if (KS == 1 && rows == 0) return;  // the whole warp (KS > 1: its block's merge needs it)
    float acc[SG_ROWS][M];
#pragma unroll
    for (int r = 0; r < SG_ROWS; ++r)
#pragma unroll
        for (int m = 0; m < M; ++m) acc[r][m] = 0.0f;
#pragma unroll
    for (int p = 0; p < SG_PREFETCH; ++p)
        if (v_lo + lane + 32 * p < v_hi) skinny_step<T, M, XS>(xv, vecs, v_lo + lane + 32 * p, first[p], rows, acc);

#pragma unroll 4
    for (int v = v_lo + lane + 32 * SG_PREFETCH; v < v_hi; v += 32) {
        uint4 wr[SG_ROWS];
#pragma unroll
        for (int r = 0; r < SG_ROWS; ++r)
            if (r < rows) wr[r] = __ldcs(wv + r * row_vecs + v);
        skinny_step<T, M, XS>(xv, vecs, v, wr, rows, acc);
    }
#pragma unroll
    for (int r = 0; r < SG_ROWS; ++r)
#pragma unroll
        for (int m = 0; m < M; ++m) acc[r][m] = warp_sum(acc[r][m]);
    if (KS > 1 && !skinny_merge_k_parts<M, KS>(acc, lane, ks, rows)) return;
    if (lane == 0 && gated) {
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

template <typename T, int M, int KS>
__global__ void skinny_gemm_kernel(const T* x, const T* w, T* y, int N, int K, int accumulate, int gated) {
    skinny_tile<T, M, KS, false>(x, w, y, N, K, accumulate, gated, blockIdx.x, [] { pdl_begin(); });
}

// ---- RMSNorm fused in front: norm_skinny_gemm_kernel ----------------------------------
//
// y = linear(rms_norm(x (+ residual)), w), as rms_norm_vec_kernel then skinny_gemm_kernel,
// in one launch: every block normalises the M rows into shared memory exactly as
// rms_norm_vec_kernel does with norm_threads threads a row (the same thread sums the same
// vectors in the same order, the warp sums merged as block_sum merges them), so y is
// bitwise the two kernels' at the same K split; block 0 writes the new residual (x +
// residual, rounded) to residual_out, which must not alias x or residual. The blocks loop
// over the launch's `tiles` (gridDim.x <= tiles), so fewer blocks normalise the rows.
// Requires norm_threads <= SG_WARPS * 32 and a multiple of 32, K <= 8 * SG_NORM_VECS *
// norm_threads (the norm's width is K), and M * K * sizeof(T) bytes of dynamic shared memory.

#define SG_NORM_VECS 4   // NORM_VECS in norms.cu: vectors a norm thread owns

template <typename T, int M>
__device__ __forceinline__ void skinny_norm_rows(const T* x, const T* residual, const T* norm_weight,
                                                 T* residual_out, int has_residual, int hidden, float eps,
                                                 int norm_threads, uint4* xs) {
    __shared__ float warp_sums[M][SG_WARPS];
    const int vecs = hidden / 8, t = threadIdx.x, lane = t & 31;
    // Pass 1: h = x (+ residual, rounded), kept in xs; its sum of squares, per thread then per warp.
#pragma unroll
    for (int m = 0; m < M; ++m) {
        float sum_sq = 0.0f;
#pragma unroll
        for (int j = 0; j < SG_NORM_VECS; ++j) {
            const int v = t + j * norm_threads;
            if (t >= norm_threads || v >= vecs) continue;
            const long long at = (long long)m * vecs + v;
            float h[8];
            unpack8<T>(reinterpret_cast<const uint4*>(x)[at], h);
            if (has_residual) {
                float r[8];
                unpack8<T>(reinterpret_cast<const uint4*>(residual)[at], r);
#pragma unroll
                for (int i = 0; i < 8; ++i) h[i] = round_to<T>(h[i] + r[i]);
                if (blockIdx.x == 0) reinterpret_cast<uint4*>(residual_out)[at] = pack8<T>(h);
            }
#pragma unroll
            for (int i = 0; i < 8; ++i) sum_sq += h[i] * h[i];
            xs[at] = pack8<T>(h);
        }
        sum_sq = warp_sum(sum_sq);
        if (lane == 0) warp_sums[m][t >> 5] = sum_sq;
    }
    __syncthreads();
    // Pass 2: each thread scales the vectors it kept (h is exact in T: no rounding on the way).
#pragma unroll
    for (int m = 0; m < M; ++m) {
        const float total = warp_sum(lane < norm_threads / 32 ? warp_sums[m][lane] : 0.0f);
        const float inv_rms = 1.0f / sqrtf(total / hidden + eps);
#pragma unroll
        for (int j = 0; j < SG_NORM_VECS; ++j) {
            const int v = t + j * norm_threads;
            if (t >= norm_threads || v >= vecs) continue;
            const long long at = (long long)m * vecs + v;
            float h[8], w[8];
            unpack8<T>(xs[at], h);
            unpack8<T>(reinterpret_cast<const uint4*>(norm_weight)[v], w);
#pragma unroll
            for (int i = 0; i < 8; ++i) h[i] = round_to<T>(h[i] * inv_rms) * w[i];
            xs[at] = pack8<T>(h);
        }
    }
    __syncthreads();
}

template <typename T, int M, int KS>
__global__ void norm_skinny_gemm_kernel(const T* x, const T* residual, const T* norm_weight, T* residual_out,
                                        int has_residual, float eps, int norm_threads, const T* w, T* y, int N,
                                        int K, int accumulate, int gated, int tiles) {
    extern __shared__ uint4 xs[];   // [M][K / 8]: the normalised rows
    const T* normed = reinterpret_cast<const T*>(xs);
    skinny_tile<T, M, KS, true>(normed, w, y, N, K, accumulate, gated, blockIdx.x, [&] {
        pdl_begin();
        skinny_norm_rows<T, M>(x, residual, norm_weight, residual_out, has_residual, K, eps, norm_threads, xs);
    });
    // KS > 1: the tile before must be done with skinny_merge_k_parts' shared memory.
    for (int tile = blockIdx.x + gridDim.x; tile < tiles; tile += gridDim.x)
        skinny_tile<T, M, KS, true>(normed, w, y, N, K, accumulate, gated, tile, [] { if (KS > 1) __syncthreads(); });
}

// Decode-sized GEMMs: y[m, n] = sum_k a[m, k] w[n, k] (+ y[m, n] when
// accumulate, which adds a bias the caller filled in) for M <= 4 rows, bf16
// or fp16 in, fp32 accumulate. Such a GEMM is one pass over the weight, so it
// should run at the memory's read rate: one warp per SG_ROWS output
// features, lanes striding over k in 16-byte vectors (a warp reads 512
// contiguous bytes of a weight row per step, streamed past L1 with
// __ldcs), the input re-read through the read-only cache (it is small).
// Loops are unrolled so several loads are in flight per lane.
//
// Since every warp walks all of k, the input row a[m, :] can be made on the
// fly from what precedes the GEMM (the prologue P), saving that kernel:
// - SG_PLAIN: a = x.
// - SG_NORM: RMSNorm of h = x (+ residual, rounded to storage), a = h * g
//   (g the norm weight); the warp sums h^2 as it goes and scales its dot
//   products by 1 / sqrt(mean(h^2) + eps) at the end. With has_residual,
//   warp 0 of block 0 also stores h, the new residual stream, to
//   residual_out. Unused pointers may be any valid array.
// - SG_SILU: a = silu(gate) * up rounded to storage, x = [gate | up] of 2K
//   columns (the same values silu_and_mul_kernel writes).
//
// Requires K % 8 == 0 and 16-byte aligned rows (checked on the host).
// blockDim.x == SG_WARPS * 32.

#define SG_ROWS 2
#define SG_WARPS 8
#define SG_PLAIN 0
#define SG_NORM 1
#define SG_SILU 2

template <typename T>
__device__ __forceinline__ void unpack8(const uint4& packed, float* f) {
    const T* e = reinterpret_cast<const T*>(&packed);
#pragma unroll
    for (int i = 0; i < 8; ++i) f[i] = to_f(e[i]);
}

template <typename T>
__device__ __forceinline__ uint4 pack8(const float* f) {
    uint4 packed;
    T* e = reinterpret_cast<T*>(&packed);
#pragma unroll
    for (int i = 0; i < 8; ++i) e[i] = from_f<T>(f[i]);
    return packed;
}

// What the prologue reads besides x.
template <typename T>
struct SkinnyInput {
    const T* x;
    const T* residual;     // SG_NORM with has_residual: added to x
    const T* norm_weight;  // SG_NORM
    T* residual_out;       // SG_NORM with has_residual: h goes here
    float eps;             // SG_NORM
    int has_residual;
};

// Elements 8v..8v+7 of input row m into a[]; SG_NORM also adds their h^2 to sum_sq.
template <typename T, int P>
__device__ __forceinline__ void input8(const SkinnyInput<T>& in, int m, int vecs, int v, bool writer,
                                       const float* g, float* a, float& sum_sq) {
    const uint4* xv = reinterpret_cast<const uint4*>(in.x);
    if (P == SG_PLAIN) {
        unpack8<T>(__ldg(xv + (long long)m * vecs + v), a);
    } else if (P == SG_SILU) {
        float up[8];
        unpack8<T>(__ldg(xv + (long long)m * 2 * vecs + v), a);
        unpack8<T>(__ldg(xv + (long long)m * 2 * vecs + vecs + v), up);
#pragma unroll
        for (int i = 0; i < 8; ++i) a[i] = round_to<T>(a[i] / (1.0f + expf(-a[i])) * up[i]);
    } else {
        const long long at = (long long)m * vecs + v;
        unpack8<T>(__ldg(xv + at), a);
        if (in.has_residual) {
            float r[8];
            unpack8<T>(__ldg(reinterpret_cast<const uint4*>(in.residual) + at), r);
#pragma unroll
            for (int i = 0; i < 8; ++i) a[i] = round_to<T>(a[i] + r[i]);
            if (writer) reinterpret_cast<uint4*>(in.residual_out)[at] = pack8<T>(a);
        }
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            sum_sq = fmaf(a[i], a[i], sum_sq);
            a[i] *= g[i];
        }
    }
}

template <typename T, int M, int P>
__global__ void skinny_gemm_kernel(const T* x, const T* residual, const T* norm_weight, T* residual_out,
                                   int has_residual, float eps, const T* w, T* y, int N, int K, int accumulate) {
    const SkinnyInput<T> in = {x, residual, norm_weight, residual_out, eps, has_residual};
    const int lane = threadIdx.x & 31;
    const int n0 = (blockIdx.x * SG_WARPS + (threadIdx.x >> 5)) * SG_ROWS;
    if (n0 >= N) return;  // the whole warp
    const bool writer = blockIdx.x == 0 && threadIdx.x < 32;
    const int rows = min(SG_ROWS, N - n0), vecs = K / 8;
    const uint4* wv = reinterpret_cast<const uint4*>(w + (long long)n0 * K);
    float acc[SG_ROWS][M], sum_sq[M];
#pragma unroll
    for (int m = 0; m < M; ++m) {
        sum_sq[m] = 0.0f;
#pragma unroll
        for (int r = 0; r < SG_ROWS; ++r) acc[r][m] = 0.0f;
    }

#pragma unroll 4
    for (int v = lane; v < vecs; v += 32) {
        float g[8], a[M][8];
        if (P == SG_NORM) unpack8<T>(__ldg(reinterpret_cast<const uint4*>(in.norm_weight) + v), g);
#pragma unroll
        for (int m = 0; m < M; ++m) input8<T, P>(in, m, vecs, v, writer, g, a[m], sum_sq[m]);
#pragma unroll
        for (int r = 0; r < SG_ROWS; ++r) {
            if (r < rows) {
                float wf[8];
                unpack8<T>(__ldcs(wv + (long long)r * vecs + v), wf);
#pragma unroll
                for (int m = 0; m < M; ++m)
#pragma unroll
                    for (int i = 0; i < 8; ++i) acc[r][m] = fmaf(wf[i], a[m][i], acc[r][m]);
            }
        }
    }
    float scale[M];
#pragma unroll
    for (int m = 0; m < M; ++m) {
        scale[m] = P == SG_NORM ? 1.0f / sqrtf(warp_sum(sum_sq[m]) / K + in.eps) : 1.0f;
#pragma unroll
        for (int r = 0; r < SG_ROWS; ++r) acc[r][m] = warp_sum(acc[r][m]);
    }
    if (lane == 0) {
        for (int r = 0; r < rows; ++r)
            for (int m = 0; m < M; ++m) {
                T* out = y + (long long)m * N + n0 + r;
                *out = from_f<T>(acc[r][m] * scale[m] + (accumulate ? to_f(*out) : 0.0f));
            }
    }
}

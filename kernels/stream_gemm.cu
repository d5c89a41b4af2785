// Tensor-core GEMMs for decode batches of 5-64 rows: y[m, n] = sum_k x[m, k] w[n, k] (+ y[m, n]
// when accumulate, a bias the caller filled in), bf16 or fp16 in, fp32 accumulate. Such a GEMM
// is one pass over the weight, so it should run at the memory's read rate; what cuBLAS loses at
// these sizes is mostly each launch's ramp. Here the weight, which no kernel of a step writes,
// starts streaming into shared memory before the dependent-launch wait (pdl_begin), while the
// kernel before still runs.
//
// The weight rows are the mma's M (16 a tile) and the rows of x its N (8 a tile): a block owns
// SG_BN = 128 weight rows, 32 a warp (two m-tiles), over one split of K, staged SG_KC = 64
// columns at a time through STAGES cp.async buffers (x's columns with them). With several
// splits each block writes fp32 partial sums and the last of a tile's splits adds them up
// (flash_merge_splits' counter scheme).
//
// gated: w is [2N, K], gate rows then up rows, and y[m, n] = silu(gate) * up, both rounded to T
// first, as silu_and_mul_kernel computes it from the unfused GEMM's output. A block then owns 64
// outputs: each warp's first m-tile holds 16 gate rows and its second the matching up rows.
//
// Requires K % 8 == 0 and 16-byte aligned x, w (checked on the host). blockDim.x == 128.

#define SG_BN 128
#define SG_KC 64
#define SG_LD (SG_KC + 8)   // shared row pitch in elements: ldmatrix's 8 rows fall in distinct banks
#define SG_STAGES 4

// Weight row of this block's local row r (0..127): warp r / 32, m-tile (r / 16) % 2.
__device__ __forceinline__ long long stream_weight_row(int tile, int r, int N, int gated) {
    if (!gated) return (long long)tile * SG_BN + r;
    const int warp = r / 32, mt = (r / 16) % 2;
    return (long long)mt * N + tile * (SG_BN / 2) + warp * 16 + r % 16;
}

template <typename T, int M>
__device__ __forceinline__ void stream_load(T* ws, T* xs, const T* w, const T* x, int tile, int chunk, int rows,
                                            int N, int K, int gated, bool weights) {
    const int k0 = chunk * SG_KC, num_w = gated ? 2 * N : N;
    constexpr int VECS = SG_KC / 8;
    if (weights) {
#pragma unroll
        for (int q = 0; q < SG_BN * VECS / 128; ++q) {
            const int i = threadIdx.x + q * 128, r = i / VECS, c = (i % VECS) * 8;
            const long long n = stream_weight_row(tile, r, N, gated);
            const bool ok = (gated ? tile * (SG_BN / 2) + (r / 32) * 16 + r % 16 < N : n < num_w) && k0 + c < K;
            cp_async16(ws + r * SG_LD + c, w + (ok ? n * K + k0 + c : 0), ok);
        }
    } else {
#pragma unroll
        for (int q = 0; q < M * VECS / 128; ++q) {
            const int i = threadIdx.x + q * 128, r = i / VECS, c = (i % VECS) * 8;
            const bool ok = r < rows && k0 + c < K;
            cp_async16(xs + r * SG_LD + c, x + (ok ? (long long)r * K + k0 + c : 0), ok);
        }
    }
}

// Writes a finished (weight row, x row) pair of sums: the output, or the gate applied.
template <typename T>
__device__ __forceinline__ void stream_put(T* y, int m, long long n, int N, float acc, float up, int accumulate,
                                           int gated) {
    T* out = y + (long long)m * N + n;
    *out = gated ? from_f<T>(silu_mul(round_to<T>(acc), round_to<T>(up)))
                 : from_f<T>(acc + (accumulate ? to_f(*out) : 0.0f));
}

template <typename T, int M>
__global__ void __launch_bounds__(128, 2)
    stream_gemm_kernel(const T* x, const T* w, T* y, float* partial, int* counters, int rows, int N, int K,
                       int accumulate, int gated, int chunks_per_split) {
    constexpr int NT = M / 8;   // the mma's n-tiles of x rows
    extern __shared__ __align__(128) unsigned char smem[];
    T* w_stages = reinterpret_cast<T*>(smem);              // [STAGES][SG_BN][SG_LD]
    T* x_stages = w_stages + SG_STAGES * SG_BN * SG_LD;    // [STAGES][M][SG_LD]
    const int tile = blockIdx.x, split = blockIdx.y, num_splits = gridDim.y;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t4 = lane & 3;
    const int mi = lane >> 3, mr = lane & 7;
    const int chunks = (K + SG_KC - 1) / SG_KC;
    const int c_begin = split * chunks_per_split, c_end = min(chunks, c_begin + chunks_per_split);
    const T* tag = nullptr;
    auto w_stage = [&](int s) { return w_stages + s * SG_BN * SG_LD; };
    auto x_stage = [&](int s) { return x_stages + s * M * SG_LD; };

    // One commit group per stage's weights, then (after the wait) one per stage's x.
    for (int s = 0; s < SG_STAGES - 1; ++s) {
        if (c_begin + s < c_end) stream_load<T, M>(w_stage(s), nullptr, w, x, tile, c_begin + s, rows, N, K, gated, true);
        asm volatile("cp.async.commit_group;\n" ::);
    }
    pdl_begin();
    for (int s = 0; s < SG_STAGES - 1; ++s) {
        if (c_begin + s < c_end) stream_load<T, M>(nullptr, x_stage(s), w, x, tile, c_begin + s, rows, N, K, gated, false);
        asm volatile("cp.async.commit_group;\n" ::);
    }
    float acc[2][NT][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int j = 0; j < NT; ++j) acc[mt][j][0] = acc[mt][j][1] = acc[mt][j][2] = acc[mt][j][3] = 0.0f;

    for (int c = c_begin, it = 0; c < c_end; ++c, ++it) {
        const int ahead = c + SG_STAGES - 1, slot = (it + SG_STAGES - 1) % SG_STAGES;
        if (ahead < c_end) {
            stream_load<T, M>(w_stage(slot), nullptr, w, x, tile, ahead, rows, N, K, gated, true);
            stream_load<T, M>(nullptr, x_stage(slot), w, x, tile, ahead, rows, N, K, gated, false);
        }
        asm volatile("cp.async.commit_group;\n" ::);
        asm volatile("cp.async.wait_group %0;\n" ::"n"(SG_STAGES - 1));
        __syncthreads();
        const T* ws = w_stage(it % SG_STAGES) + warp * 32 * SG_LD;
        const T* xs = x_stage(it % SG_STAGES);
#pragma unroll
        for (int ks = 0; ks < SG_KC / 16; ++ks) {
            unsigned a[2][4];   // weight rows 16 mt + (mi % 2) * 8 + mr, columns 16 ks + (mi / 2) * 8
#pragma unroll
            for (int mt = 0; mt < 2; ++mt)
                ldmatrix_x4(a[mt], ws + (mt * 16 + (mi & 1) * 8 + mr) * SG_LD + ks * 16 + (mi >> 1) * 8);
#pragma unroll
            for (int j = 0; j < NT; j += 2) {
                unsigned b[4];   // x rows 8 (j + mi / 2) + mr, columns 16 ks + (mi % 2) * 8
                ldmatrix_x4(b, xs + ((j + (mi >> 1)) * 8 + mr) * SG_LD + ks * 16 + (mi & 1) * 8);
#pragma unroll
                for (int mt = 0; mt < 2; ++mt) {
                    mma16816(acc[mt][j], a[mt], b[0], b[1], tag);
                    mma16816(acc[mt][j + 1], a[mt], b[2], b[3], tag);
                }
            }
        }
        __syncthreads();   // the stage is free for the load STAGES - 1 chunks on
    }
    asm volatile("cp.async.wait_group 0;\n" ::);

    // acc[mt][j][e]: local weight row 32 warp + 16 mt + g + 8 (e / 2), x row 8 j + 2 t4 + e % 2.
    const int num_w = gated ? 2 * N : N, outputs = gated ? N : num_w;
    if (num_splits == 1) {
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int m = 8 * j + 2 * t4 + (e & 1), r = warp * 32 + g + 8 * (e >> 1);
                const long long n = gated ? (long long)tile * (SG_BN / 2) + warp * 16 + g + 8 * (e >> 1)
                                          : stream_weight_row(tile, r, N, 0);
                if (m < rows && n < outputs) {
                    if (gated) stream_put(y, m, n, N, acc[0][j][e], acc[1][j][e], 0, 1);
                    else {
                        stream_put(y, m, n, N, acc[0][j][e], 0.0f, accumulate, 0);
                        if (n + 16 < outputs) stream_put(y, m, n + 16, N, acc[1][j][e], 0.0f, accumulate, 0);
                    }
                }
            }
        return;
    }
    // Partial sums [split][rows][2N or N] by weight row, then the last split of the tile adds them.
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int m = 8 * j + 2 * t4 + (e & 1), r = warp * 32 + mt * 16 + g + 8 * (e >> 1);
                const long long n = stream_weight_row(tile, r, N, gated);
                const bool real = gated ? tile * (SG_BN / 2) + warp * 16 + g + 8 * (e >> 1) < N : n < num_w;
                if (m < rows && real) partial[((long long)split * rows + m) * num_w + n] = acc[mt][j][e];
            }
    __shared__ int last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        last = atomicAdd(counters + tile, 1) == num_splits - 1;
        if (last) counters[tile] = 0;   // ready for the next launch
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    const int per_tile = gated ? SG_BN / 2 : SG_BN;
    for (int idx = threadIdx.x; idx < per_tile * rows; idx += blockDim.x) {
        const int m = idx / per_tile;
        const long long n = (long long)tile * per_tile + idx % per_tile;
        if (n >= outputs) continue;
        float sum = 0.0f, up = 0.0f;
        for (int s = 0; s < num_splits; ++s) {
            const float* row = partial + ((long long)s * rows + m) * num_w;
            sum += __ldcg(row + n);
            if (gated) up += __ldcg(row + N + n);
        }
        stream_put(y, m, n, N, sum, up, accumulate, gated);
    }
}

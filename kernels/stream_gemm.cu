// Tensor-core GEMMs for decode batches of 5-64 rows: y[m, n] = sum_k x[m, k] w[n, k] (+ y[m, n]
// when accumulate, a bias the caller filled in), bf16 or fp16 in, fp32 accumulate. Such a GEMM
// is one pass over the weight, so it should run at the memory's read rate; what cuBLAS loses at
// these sizes is mostly each launch's ramp. Here the weight, which no kernel of a step writes,
// starts streaming into shared memory before the dependent-launch wait (pdl_begin), while the
// kernel before still runs.
//
// The weight rows are the mma's M (16 a tile) and the rows of x its N (8 a tile): a block owns
// SG_BN = 128 weight rows, 32 a warp (two m-tiles), over one split of K, staged KC columns at a
// time through STAGES cp.async buffers (x's columns with them). The splits of a tile run as one
// thread-block cluster (gridDim.y blocks): each leaves its sums in its shared memory, and after
// a cluster barrier each adds up one slice of the rows from all of them (distributed shared
// memory) and writes it.
//
// gated: w is [2N, K], gate rows then up rows, and y[m, n] = silu(gate) * up, both rounded to T
// first, as silu_and_mul_kernel computes it from the unfused GEMM's output. A block then owns 64
// outputs: each warp's first m-tile holds 16 gate rows and its second the matching up rows.
//
// Requires K % 8 == 0 and 16-byte aligned x, w (checked on the host). blockDim.x == 128.

#define SG_BN 128

// Weight row of this block's local row r (0..127): warp r / 32, m-tile (r / 16) % 2.
__device__ __forceinline__ long long stream_weight_row(int tile, int r, int N, int gated) {
    if (!gated) return (long long)tile * SG_BN + r;
    return (long long)((r / 16) % 2) * N + tile * (SG_BN / 2) + (r / 32) * 16 + r % 16;
}

// Output (feature) of local row r: itself, or gated, the output its gate / up row feeds.
__device__ __forceinline__ long long stream_output(int tile, int r, int gated) {
    return gated ? (long long)tile * (SG_BN / 2) + (r / 32) * 16 + r % 16 : (long long)tile * SG_BN + r;
}

// Chunk `chunk` (KC columns) of the block's weight rows (WEIGHTS) or of x's rows into shared memory.
template <typename T, int M, int KC, bool WEIGHTS>
__device__ __forceinline__ void stream_load(T* dst, const T* src, int tile, int chunk, int rows, int N, int K,
                                            int gated) {
    constexpr int LD = KC + 8, VECS = KC / 8;
    const int k0 = chunk * KC;
#pragma unroll
    for (int q = 0; q < (WEIGHTS ? SG_BN : M) * VECS / 128; ++q) {
        const int i = threadIdx.x + q * 128, r = i / VECS, c = (i % VECS) * 8;
        const bool ok = (WEIGHTS ? stream_output(tile, r, gated) < N : r < rows) && k0 + c < K;
        const long long row = WEIGHTS ? stream_weight_row(tile, r, N, gated) : r;
        cp_async16(dst + r * LD + c, src + (ok ? row * K + k0 + c : 0), ok);
    }
}

// y[m, n] from a finished sum (and, gated, its up row's sum).
template <typename T>
__device__ __forceinline__ void stream_put(T* y, int m, long long n, int N, float acc, float up, int accumulate,
                                           int gated) {
    T* out = y + (long long)m * N + n;
    *out = gated ? from_f<T>(silu_mul(round_to<T>(acc), round_to<T>(up)))
                 : from_f<T>(acc + (accumulate ? to_f(*out) : 0.0f));
}

__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}

// Four floats at p in the shared memory of the cluster's block `rank`.
__device__ __forceinline__ float4 cluster_load4(const float* p, unsigned rank) {
    unsigned remote;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(smem_u32(p)), "r"(rank));
    float4 v;
    asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];\n"
                 : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "r"(remote) : "memory");
    return v;
}

// The splits' merge: sums [SG_BN][M + 4] floats in each block's shared memory; this block
// (split `split` of the cluster's `splits`) adds up its slice of the outputs and writes them.
template <typename T, int M>
__device__ void stream_merge(const float* sums, T* y, int tile, int split, int splits, int rows, int N,
                             int accumulate, int gated) {
    constexpr int LDS = M + 4, QUADS = M / 4;
    const int per_tile = gated ? SG_BN / 2 : SG_BN, slice = per_tile / splits;
    for (int idx = threadIdx.x; idx < slice * QUADS; idx += blockDim.x) {
        const int o = split * slice + idx / QUADS, m = (idx % QUADS) * 4;   // local output, first x row
        const int r = gated ? (o / 16) * 32 + o % 16 : o;                   // its (gate) row; up: r + 16
        float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f), up = acc;
        for (int q = 0; q < splits; ++q) {
            const float4 a = cluster_load4(sums + r * LDS + m, q);
            acc = make_float4(acc.x + a.x, acc.y + a.y, acc.z + a.z, acc.w + a.w);
            if (gated) {
                const float4 u = cluster_load4(sums + (r + 16) * LDS + m, q);
                up = make_float4(up.x + u.x, up.y + u.y, up.z + u.z, up.w + u.w);
            }
        }
        const long long n = stream_output(tile, r, gated);
        const float sum[4] = {acc.x, acc.y, acc.z, acc.w}, ups[4] = {up.x, up.y, up.z, up.w};
        for (int i = 0; i < 4; ++i)
            if (m + i < rows && n < N) stream_put(y, m + i, n, N, sum[i], ups[i], accumulate, gated);
    }
}

template <typename T, int M, int KC, int STAGES>
__global__ void __launch_bounds__(128)
    stream_gemm_kernel(const T* x, const T* w, T* y, int rows, int N, int K, int accumulate, int gated,
                       int chunks_per_split) {
    constexpr int NT = M / 8, LD = KC + 8;   // the mma's n-tiles of x rows; shared row pitch (elements)
    extern __shared__ __align__(128) unsigned char smem[];
    T* w_stages = reinterpret_cast<T*>(smem);              // [STAGES][SG_BN][LD]
    T* x_stages = w_stages + STAGES * SG_BN * LD;          // [STAGES][M][LD]
    const int tile = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t4 = lane & 3;
    const int mi = lane >> 3, mr = lane & 7;
    const int chunks = (K + KC - 1) / KC;
    const int c_begin = split * chunks_per_split, c_end = min(chunks, c_begin + chunks_per_split);
    const T* tag = nullptr;

    // One commit group per stage's weights, then (after the wait) one per stage's x.
    for (int s = 0; s < STAGES - 1; ++s) {
        if (c_begin + s < c_end)
            stream_load<T, M, KC, true>(w_stages + s * SG_BN * LD, w, tile, c_begin + s, rows, N, K, gated);
        asm volatile("cp.async.commit_group;\n" ::);
    }
    pdl_begin();
    for (int s = 0; s < STAGES - 1; ++s) {
        if (c_begin + s < c_end)
            stream_load<T, M, KC, false>(x_stages + s * M * LD, x, tile, c_begin + s, rows, N, K, gated);
        asm volatile("cp.async.commit_group;\n" ::);
    }
    float acc[2][NT][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int j = 0; j < NT; ++j) acc[mt][j][0] = acc[mt][j][1] = acc[mt][j][2] = acc[mt][j][3] = 0.0f;

    for (int c = c_begin, it = 0; c < c_end; ++c, ++it) {
        const int ahead = c + STAGES - 1, slot = (it + STAGES - 1) % STAGES;
        if (ahead < c_end) {
            stream_load<T, M, KC, true>(w_stages + slot * SG_BN * LD, w, tile, ahead, rows, N, K, gated);
            stream_load<T, M, KC, false>(x_stages + slot * M * LD, x, tile, ahead, rows, N, K, gated);
        }
        asm volatile("cp.async.commit_group;\n" ::);
        asm volatile("cp.async.wait_group %0;\n" ::"n"(STAGES - 1));
        __syncthreads();
        const T* ws = w_stages + (it % STAGES) * SG_BN * LD + warp * 32 * LD;
        const T* xs = x_stages + (it % STAGES) * M * LD;
#pragma unroll
        for (int ks = 0; ks < KC / 16; ++ks) {
            unsigned a[2][4];   // weight rows 16 mt + (mi % 2) * 8 + mr, columns 16 ks + (mi / 2) * 8
#pragma unroll
            for (int mt = 0; mt < 2; ++mt)
                ldmatrix_x4(a[mt], ws + (mt * 16 + (mi & 1) * 8 + mr) * LD + ks * 16 + (mi >> 1) * 8);
#pragma unroll
            for (int j = 0; j < NT; j += 2) {
                unsigned b[4];   // x rows 8 (j + mi / 2) + mr, columns 16 ks + (mi % 2) * 8
                ldmatrix_x4(b, xs + ((j + (mi >> 1)) * 8 + mr) * LD + ks * 16 + (mi & 1) * 8);
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

    // acc[mt][j][e]: local row 32 warp + 16 mt + g + 8 (e / 2), x row 8 j + 2 t4 + e % 2.
    if (splits == 1) {
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int m = 8 * j + 2 * t4 + (e & 1), r = warp * 32 + g + 8 * (e >> 1);
                const long long n = stream_output(tile, r, gated);
                if (m >= rows || n >= N) continue;
                if (gated) {
                    stream_put(y, m, n, N, acc[0][j][e], acc[1][j][e], 0, 1);
                } else {
                    stream_put(y, m, n, N, acc[0][j][e], 0.0f, accumulate, 0);
                    if (n + 16 < N) stream_put(y, m, n + 16, N, acc[1][j][e], 0.0f, accumulate, 0);
                }
            }
        return;
    }
    float* sums = reinterpret_cast<float*>(smem);   // [SG_BN][M + 4]: the stages are done with
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int r = warp * 32 + mt * 16 + g + 8 * h, m = 8 * j + 2 * t4;
                *reinterpret_cast<float2*>(sums + r * (M + 4) + m) = make_float2(acc[mt][j][2 * h],
                                                                                 acc[mt][j][2 * h + 1]);
            }
    cluster_sync();   // every split's sums are in place
    stream_merge<T, M>(sums, y, tile, split, splits, rows, N, accumulate, gated);
    cluster_sync();   // no block leaves while another reads its shared memory
}

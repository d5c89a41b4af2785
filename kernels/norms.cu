// Row-wise reductions: rms_norm and layer_norm (optionally fused with the
// residual add), softmax over the last axis, and MoE top-k gating.
//
// One block per row, float32 accumulation. The residual variants write the
// new residual stream (x + residual, rounded to storage) and normalise that
// rounded value, so the returned pair is consistent. No allocation, no host
// synchronisation.

template <typename T>
__device__ __forceinline__ float residual_in(const T* x, const T* residual, T* residual_out, int has_residual,
                                             long long i) {
    // h = x (+ residual), rounded to storage and stored as the new residual.
    if (!has_residual) return to_f(x[i]);
    const T h = from_f<T>(to_f(x[i]) + to_f(residual[i]));
    residual_out[i] = h;
    return to_f(h);
}

template <typename T>
__global__ void __launch_bounds__(1024)
rms_norm_kernel(const T* x, const T* residual, const T* weight, T* out, T* residual_out, int has_residual,
                int hidden, float eps) {
    pdl_begin();
    const long long base = blockIdx.x * (long long)hidden;
    float sum_sq = 0.0f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        const float h = residual_in(x, residual, residual_out, has_residual, base + i);
        sum_sq += h * h;
    }
    const float inv_rms = 1.0f / sqrtf(block_sum(sum_sq) / hidden + eps);
    // Each thread re-reads only the residual elements it wrote itself.
    const T* h_src = has_residual ? residual_out : x;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        const float normed = round_to<T>(to_f(h_src[base + i]) * inv_rms);
        out[base + i] = from_f<T>(normed * to_f(weight[i]));
    }
}

// rms_norm_kernel for 16-bit storage, hidden % 8 == 0 and 16-byte aligned rows: each
// thread keeps its (at most NORM_VECS) 8-element vectors in registers, packed, so x and the
// residual are read once, in 16-byte loads, all before the first store (x, residual and
// residual_out may alias as far as the compiler knows, so a store between two loads would
// hold the second back a round trip). Same rounding as rms_norm_kernel.
#define NORM_VECS 4

template <typename T>
__global__ void __launch_bounds__(1024)
rms_norm_vec_kernel(const T* x, const T* residual, const T* weight, T* out, T* residual_out, int has_residual,
                    int hidden, float eps) {
    const int vecs = hidden / 8;
    uint4 weights[NORM_VECS];   // no kernel writes them: read before waiting for the one before
#pragma unroll
    for (int j = 0; j < NORM_VECS; ++j) {
        const int v = threadIdx.x + j * blockDim.x;
        if (v < vecs) weights[j] = reinterpret_cast<const uint4*>(weight)[v];
    }
    pdl_begin();
    const long long base = blockIdx.x * (long long)vecs;
    uint4 xs[NORM_VECS], rs[NORM_VECS];
#pragma unroll
    for (int j = 0; j < NORM_VECS; ++j) {
        const int v = threadIdx.x + j * blockDim.x;
        if (v >= vecs) continue;
        xs[j] = reinterpret_cast<const uint4*>(x)[base + v];
        if (has_residual) rs[j] = reinterpret_cast<const uint4*>(residual)[base + v];
    }
    float sum_sq = 0.0f;
#pragma unroll
    for (int j = 0; j < NORM_VECS; ++j) {
        const int v = threadIdx.x + j * blockDim.x;
        if (v >= vecs) continue;
        float h[8];
        unpack8<T>(xs[j], h);
        if (has_residual) {
            float r[8];
            unpack8<T>(rs[j], r);
#pragma unroll
            for (int i = 0; i < 8; ++i) h[i] = round_to<T>(h[i] + r[i]);
            xs[j] = pack8<T>(h);   // exact: h is rounded to T already
            reinterpret_cast<uint4*>(residual_out)[base + v] = xs[j];
        }
#pragma unroll
        for (int i = 0; i < 8; ++i) sum_sq += h[i] * h[i];
    }
    const float inv_rms = 1.0f / sqrtf(block_sum(sum_sq) / hidden + eps);
#pragma unroll
    for (int j = 0; j < NORM_VECS; ++j) {
        const int v = threadIdx.x + j * blockDim.x;
        if (v >= vecs) continue;
        float h[8], w[8];
        unpack8<T>(xs[j], h);
        unpack8<T>(weights[j], w);
#pragma unroll
        for (int i = 0; i < 8; ++i) h[i] = round_to<T>(h[i] * inv_rms) * w[i];
        reinterpret_cast<uint4*>(out)[base + v] = pack8<T>(h);
    }
}

template <typename T>
__global__ void __launch_bounds__(1024)
layer_norm_kernel(const T* x, const T* residual, const T* weight, const T* bias, T* out, T* residual_out,
                  int has_residual, int hidden, float eps) {
    pdl_begin();
    const long long base = blockIdx.x * (long long)hidden;
    float sum = 0.0f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        sum += residual_in(x, residual, residual_out, has_residual, base + i);
    }
    const float mean = block_sum(sum) / hidden;
    const T* h_src = has_residual ? residual_out : x;
    float sum_sq = 0.0f;  // two passes: no cancellation from E[h^2] - mean^2
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        const float d = to_f(h_src[base + i]) - mean;
        sum_sq += d * d;
    }
    const float inv_std = 1.0f / sqrtf(block_sum(sum_sq) / hidden + eps);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        const float normed = round_to<T>((to_f(h_src[base + i]) - mean) * inv_std);
        out[base + i] = from_f<T>(normed * to_f(weight[i]) + to_f(bias[i]));
    }
}

template <typename T>
__global__ void __launch_bounds__(1024)
softmax_kernel(const T* x, float* out, int width) {
    pdl_begin();
    const T* row = x + blockIdx.x * (long long)width;
    float* dst = out + blockIdx.x * (long long)width;
    float m = -SHARDLINE_INF;
    for (int i = threadIdx.x; i < width; i += blockDim.x) m = fmaxf(m, to_f(row[i]));
    m = block_max(m);
    float s = 0.0f;
    for (int i = threadIdx.x; i < width; i += blockDim.x) s += expf(to_f(row[i]) - m);
    s = block_sum(s);
    for (int i = threadIdx.x; i < width; i += blockDim.x) dst[i] = expf(to_f(row[i]) - m) / s;
}

template <typename T>
__global__ void __launch_bounds__(1024)
topk_softmax_kernel(const T* logits, float* weights, int* ids, int num_experts, int top_k, int renormalize) {
    pdl_begin();
    // One block per token; the expert probabilities live in dynamic shared
    // memory and each of the top_k picks is a block argmax (lowest expert
    // id first among ties, as the reference's stable argsort).
    extern __shared__ float probs[];
    const T* row = logits + blockIdx.x * (long long)num_experts;
    float m = -SHARDLINE_INF;
    for (int i = threadIdx.x; i < num_experts; i += blockDim.x) m = fmaxf(m, to_f(row[i]));
    m = block_max(m);
    float s = 0.0f;
    for (int i = threadIdx.x; i < num_experts; i += blockDim.x) s += expf(to_f(row[i]) - m);
    s = block_sum(s);
    for (int i = threadIdx.x; i < num_experts; i += blockDim.x) probs[i] = expf(to_f(row[i]) - m) / s;
    float picked_sum = 0.0f;  // the same in every thread
    for (int j = 0; j < top_k; ++j) {
        ArgMax best = {-SHARDLINE_INF, 0x7fffffff};
        for (int i = threadIdx.x; i < num_experts; i += blockDim.x) best = better(best, ArgMax{probs[i], i});
        best = block_argmax(best);
        picked_sum += best.value;
        if (threadIdx.x == 0) {
            weights[blockIdx.x * (long long)top_k + j] = best.value;
            ids[blockIdx.x * (long long)top_k + j] = best.index;
            probs[best.index] = -1.0f;  // probabilities are >= 0: never picked again
        }
        __syncthreads();
    }
    if (renormalize && threadIdx.x == 0) {
        for (int j = 0; j < top_k; ++j) weights[blockIdx.x * (long long)top_k + j] /= picked_sum;
    }
}

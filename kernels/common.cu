// Device helpers shared by every kernel module: storage-type conversions,
// block-wide reductions and the SplitMix64 counter RNG.
//
// cuda_ops.py prepends this text to each module's source before NVRTC
// compiles it; it is never compiled alone and defines no __global__ kernel.
// Reductions assume blockDim.x is a multiple of 32 (at most 1024) and that
// every thread of the block calls them (they contain __syncthreads).

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define SHARDLINE_INF __int_as_float(0x7f800000)

// Programmatic dependent launch (sm_90 on). Inside a captured decode graph each
// kernel is launched allowed to start while the kernel before it still runs
// (cuda_ops.CudaOps.dependent_launches), which hides the launch and ramp-up gap
// between the hundreds of small kernels of a step. Every kernel therefore calls
// pdl_begin() before it touches global memory: it waits until the kernel before
// it has finished and its writes are visible (a no-op for an ordinary launch),
// then lets the kernel after it be scheduled. Because every kernel waits, a
// kernel's end implies the end of all before it.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_begin() {
    pdl_wait();
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

// silu(gate) * up, the SiLU gate of a gated MLP; every kernel that applies it calls this, so
// the fused paths give the unfused ones' values exactly.
__device__ __forceinline__ float silu_mul(float gate, float up) { return gate / (1.0f + expf(-gate)) * up; }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

// Rounds through the storage type, as the NumPy reference's astype does.
template <typename T> __device__ __forceinline__ float round_to(float x) { return to_f(from_f<T>(x)); }

// Eight 16-bit storage values in one 16-byte vector <-> floats (vectorised kernels). `packed` by
// value: a global operand is read in one 16-byte load (bound to a reference, it was read as eight
// 2-byte loads).
template <typename T>
__device__ __forceinline__ void unpack8(const uint4 packed, float* f) {
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

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ int warp_sum_int(int v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// The leading __syncthreads lets one call follow another on the same scratch.
__device__ float block_sum(float v) {
    __shared__ float scratch[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, num_warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    return warp_sum(lane < num_warps ? scratch[lane] : 0.0f);
}

// 1 / rms of one row of hidden storage values, eps inside the root (RMSNorm's scale), by every
// thread of the block: VEC reads 16-byte vectors of 16-bit storage (hidden % 8 == 0, the row
// 16-byte aligned), else one element at a time. Squares are summed in fp32.
template <typename T, bool VEC>
__device__ float row_inv_rms(const T* row, int hidden, float eps) {
    float sum_sq = 0.0f;
    if constexpr (VEC) {
        const uint4* vecs = reinterpret_cast<const uint4*>(row);
        for (int v = threadIdx.x; v < hidden / 8; v += blockDim.x) {
            float h[8];
            unpack8<T>(vecs[v], h);
#pragma unroll
            for (int i = 0; i < 8; ++i) sum_sq += h[i] * h[i];
        }
    } else {
        for (int i = threadIdx.x; i < hidden; i += blockDim.x) sum_sq += to_f(row[i]) * to_f(row[i]);
    }
    return 1.0f / sqrtf(block_sum(sum_sq) / hidden + eps);
}

__device__ float block_max(float v) {
    __shared__ float scratch[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, num_warps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    return warp_max(lane < num_warps ? scratch[lane] : -SHARDLINE_INF);
}

__device__ int block_sum_int(int v) {
    __shared__ int scratch[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, num_warps = blockDim.x >> 5;
    v = warp_sum_int(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    return warp_sum_int(lane < num_warps ? scratch[lane] : 0);
}

// Argmax with NumPy's tie rule: the lowest index wins among equal values.
struct ArgMax {
    float value;
    int index;
};

__device__ __forceinline__ ArgMax better(ArgMax a, ArgMax b) {
    return (b.value > a.value || (b.value == a.value && b.index < a.index)) ? b : a;
}

__device__ __forceinline__ ArgMax warp_argmax(ArgMax a) {
    for (int o = 16; o > 0; o >>= 1) {
        ArgMax other;
        other.value = __shfl_xor_sync(0xffffffffu, a.value, o);
        other.index = __shfl_xor_sync(0xffffffffu, a.index, o);
        a = better(a, other);
    }
    return a;
}

__device__ ArgMax block_argmax(ArgMax a) {
    __shared__ float values[32];
    __shared__ int indices[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, num_warps = blockDim.x >> 5;
    a = warp_argmax(a);
    __syncthreads();
    if (lane == 0) {
        values[warp] = a.value;
        indices[warp] = a.index;
    }
    __syncthreads();
    ArgMax b = {-SHARDLINE_INF, 0x7fffffff};
    if (lane < num_warps) {
        b.value = values[lane];
        b.index = indices[lane];
    }
    return warp_argmax(b);
}

// SplitMix64, the same steps as sampling_rng.splitmix64.
__device__ __forceinline__ unsigned long long splitmix64(unsigned long long z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// The stream of one (seed, offset): sampling_rng.uniform's `base`.
__device__ __forceinline__ unsigned long long rng_base(unsigned long long seed, long long offset) {
    return splitmix64(seed + (unsigned long long)offset * 0x9E3779B97F4A7C15ull);
}

// ((bits >> 41) + 0.5) * 2^-23 in float32, exactly as sampling_rng.uniform.
__device__ __forceinline__ float rng_uniform(unsigned long long base, long long index) {
    const unsigned long long bits = splitmix64(base + (unsigned long long)index);
    const float top = __uint2float_rn((unsigned int)(bits >> 41));
    return __fmul_rn(__fadd_rn(top, 0.5f), 1.1920928955078125e-07f);
}

// Token sampling, one block per batch row, with no host sync and no sort:
// greedy argmax, or temperature softmax -> top-k -> top-p -> min-p (ties at
// every threshold kept, as numpy_ops.filter_probs) -> exponential race
// argmax p_i / E_i with E_i = -log(u_i) from the SplitMix64 stream of
// (seed, offset), bit for bit the noise of sampling_rng.py.
//
// Thresholds are found by bisection over the bit patterns of the (non-
// negative) probabilities: for those, float order is integer order, so 31
// halvings of [0, max probability] pin the exact value. Probabilities are recomputed
// from the logits on every pass instead of being stored: no scratch memory.
// Launch with blockDim.x a multiple of 32. The penalties that may precede
// sampling are here too.

#define PROMPT_SEEN (1 << 30)

struct RowSoftmax {
    float temperature;
    float max_scaled;  // max_i logit_i / temperature
    float sum_exp;     // sum_i exp(logit_i / temperature - max_scaled)
};

__device__ __forceinline__ float logit_prob(float logit, const RowSoftmax& sm) {
    // Same float32 steps as the reference: logit / T, minus max, exp, / sum.
    return expf(logit / sm.temperature - sm.max_scaled) / sm.sum_exp;
}

// The 16 / sizeof(T) logits of one 16-byte vector.
template <typename T>
__device__ __forceinline__ void unpack_logits(const uint4 w, float (&e)[16 / sizeof(T)]) {
    if constexpr (sizeof(T) == 2) {
        unpack8<T>(w, e);
    } else {
        e[0] = __uint_as_float(w.x), e[1] = __uint_as_float(w.y), e[2] = __uint_as_float(w.z), e[3] = __uint_as_float(w.w);
    }
}

// f(i, logit) for each logit i of the row this thread takes. A row of 16-byte vectors (vocab a
// multiple of a vector, 16-byte aligned) is read LOGIT_LOADS vectors at a time, all loaded before
// any is used; one logit at a time, each pass waited a round trip a logit: 126 of them a pass for
// 1024 threads over a 128k vocabulary. Which thread takes which logit differs between the two.
#define LOGIT_LOADS 4
template <typename T, typename F>
__device__ __forceinline__ void for_each_logit(const T* x, int vocab, F&& f) {
    constexpr int E = 16 / sizeof(T);
    if (vocab % E == 0 && (reinterpret_cast<unsigned long long>(x) & 15) == 0) {
        const uint4* xv = reinterpret_cast<const uint4*>(x);
        const int vecs = vocab / E, threads = blockDim.x;
        for (int v0 = threadIdx.x; v0 < vecs; v0 += LOGIT_LOADS * threads) {
            uint4 w[LOGIT_LOADS];
#pragma unroll
            for (int u = 0; u < LOGIT_LOADS; ++u)
                if (v0 + u * threads < vecs) w[u] = xv[v0 + u * threads];
#pragma unroll
            for (int u = 0; u < LOGIT_LOADS; ++u) {
                const int v = v0 + u * threads;
                if (v >= vecs) break;
                float e[E];
                unpack_logits<T>(w[u], e);
#pragma unroll
                for (int j = 0; j < E; ++j) f(v * E + j, e[j]);
            }
        }
        return;
    }
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) f(i, to_f(x[i]));
}

template <typename T>
__device__ int row_argmax(const T* x, int vocab) {
    ArgMax best = {-SHARDLINE_INF, 0x7fffffff};
    for_each_logit(x, vocab, [&](int i, float logit) { best = better(best, ArgMax{logit, i}); });
    best = block_argmax(best);
    return best.index == 0x7fffffff ? 0 : best.index;
}

template <typename T>
__device__ RowSoftmax row_softmax(const T* x, int vocab, float temperature) {
    RowSoftmax sm = {temperature, 0.0f, 0.0f};
    float m = -SHARDLINE_INF;
    for_each_logit(x, vocab, [&](int, float logit) { m = fmaxf(m, logit / temperature); });
    sm.max_scaled = block_max(m);
    float s = 0.0f;
    for_each_logit(x, vocab, [&](int, float logit) { s += expf(logit / temperature - sm.max_scaled); });
    sm.sum_exp = block_sum(s);
    return sm;
}

// One past the largest probability's bits (the max logit's p is 1 / sum):
// nothing is >= it, so it is the bisections' exclusive upper end.
__device__ __forceinline__ unsigned int above_max_prob(const RowSoftmax& sm) {
    return __float_as_uint(1.0f / sm.sum_exp) + 1u;
}

template <typename T>
__device__ float kth_largest_prob(const T* x, int vocab, const RowSoftmax& sm, int k) {
    // Largest v with count(p >= v) >= k: the k-th largest probability.
    unsigned int lo = 0u, hi = above_max_prob(sm);  // count(p >= 0) = vocab >= k; count(p >= hi) = 0
    while (hi - lo > 1u) {
        const unsigned int mid = lo + (hi - lo) / 2u;
        const float v = __uint_as_float(mid);
        int count = 0;
        for_each_logit(x, vocab, [&](int, float logit) { count += logit_prob(logit, sm) >= v; });
        if (block_sum_int(count) >= k) lo = mid; else hi = mid;
    }
    return __uint_as_float(lo);
}

template <typename T>
__device__ float nucleus_floor(const T* x, int vocab, const RowSoftmax& sm, float kept_floor, float top_p) {
    // Largest v with sum(p : p >= v, p kept by top-k) >= top_p * sum(kept p):
    // the smallest probability of the shortest prefix (in descending order)
    // whose mass reaches top_p, i.e. desc[cut] of filter_probs.
    float kept_sum = 0.0f;
    for_each_logit(x, vocab, [&](int, float logit) {
        const float p = logit_prob(logit, sm);
        kept_sum += p >= kept_floor ? p : 0.0f;
    });
    const float target = top_p * block_sum(kept_sum);
    // The max probability always qualifies, so top_p <= 0 keeps the argmax
    // (filter_probs' cut = 0) rather than nothing.
    unsigned int lo = 0u, hi = above_max_prob(sm);
    while (hi - lo > 1u) {
        const unsigned int mid = lo + (hi - lo) / 2u;
        const float v = fmaxf(__uint_as_float(mid), kept_floor);
        float mass = 0.0f;
        for_each_logit(x, vocab, [&](int, float logit) {
            const float p = logit_prob(logit, sm);
            mass += p >= v ? p : 0.0f;
        });
        if (block_sum(mass) >= target) lo = mid; else hi = mid;
    }
    return __uint_as_float(lo);
}

template <typename T>
__device__ int exponential_race(const T* x, int vocab, const RowSoftmax& sm, float floor_prob,
                                unsigned long long seed, long long offset) {
    const unsigned long long base = rng_base(seed, offset);
    ArgMax best = {-SHARDLINE_INF, 0x7fffffff};
    for_each_logit(x, vocab, [&](int i, float logit) {
        const float p = logit_prob(logit, sm);
        const float e = -logf(rng_uniform(base, i));
        best = better(best, ArgMax{p >= floor_prob ? p / e : 0.0f, i});
    });
    best = block_argmax(best);
    return best.index == 0x7fffffff ? 0 : best.index;
}

template <typename T>
__global__ void __launch_bounds__(1024)
sample_kernel(const T* logits, int vocab, const float* temperature, const int* top_k, const float* top_p,
              const unsigned long long* seeds, const long long* offsets, const float* min_p, int* out) {
    pdl_begin();
    const int row = blockIdx.x;
    const T* x = logits + (long long)row * vocab;
    const float temp = temperature[row];
    int token;
    if (temp == 0.0f) {
        token = row_argmax(x, vocab);
    } else {
        const RowSoftmax sm = row_softmax(x, vocab, temp);
        const int k = top_k[row];
        const float p = top_p[row], mp = min_p[row];
        float floor_prob = 0.0f;  // every probability is >= 0: keeps all
        if (k > 0 && k < vocab) floor_prob = kth_largest_prob(x, vocab, sm, k);
        if (p < 1.0f) floor_prob = fmaxf(floor_prob, nucleus_floor(x, vocab, sm, floor_prob, p));
        // the largest probability survives both filters, so min-p scales it
        if (mp > 0.0f) floor_prob = fmaxf(floor_prob, mp * (1.0f / sm.sum_exp));
        token = exponential_race(x, vocab, sm, floor_prob, seeds[row], offsets[row]);
    }
    if (threadIdx.x == 0) out[row] = token;
}

__global__ void sampling_uniform_kernel(const unsigned long long* seeds, const long long* offsets, float* out,
                                        int count) {
    pdl_begin();
    // out [batch, count]: the uniforms sample_kernel draws, for tests.
    const unsigned long long base = rng_base(seeds[blockIdx.x], offsets[blockIdx.x]);
    for (int i = threadIdx.x; i < count; i += blockDim.x) {
        out[(long long)blockIdx.x * count + i] = rng_uniform(base, i);
    }
}

__global__ void penalty_counts_kernel(const int* prompt_ids, const int* prompt_lens, int max_prompt,
                                      const int* output_ids, const int* output_lens, int max_output, int* marks,
                                      int vocab) {
    pdl_begin();
    // One block per row. marks [rows, vocab]: output count in the low bits,
    // PROMPT_SEEN when the token is in the prompt. Ids out of range skipped.
    int* row = marks + blockIdx.x * (long long)vocab;
    const int num_prompt = min(prompt_lens[blockIdx.x], max_prompt);
    const int num_output = min(output_lens[blockIdx.x], max_output);
    for (int i = threadIdx.x; i < num_prompt; i += blockDim.x) {
        const int id = prompt_ids[blockIdx.x * (long long)max_prompt + i];
        if (id >= 0 && id < vocab) atomicOr(row + id, PROMPT_SEEN);
    }
    for (int i = threadIdx.x; i < num_output; i += blockDim.x) {
        const int id = output_ids[blockIdx.x * (long long)max_output + i];
        if (id >= 0 && id < vocab) atomicAdd(row + id, 1);
    }
}

template <typename T>
__global__ void apply_penalties_kernel(const T* logits, const int* marks, const float* repetition,
                                       const float* presence, const float* frequency, float* out, long long n,
                                       int vocab) {
    pdl_begin();
    // Repetition on every token seen (prompt or output): positive logits
    // divided, negative multiplied; then frequency * count and presence.
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const long long row = i / vocab;
        const int mark = marks[i], count = mark & ~PROMPT_SEEN;
        float x = to_f(logits[i]);
        if (mark != 0) x = x > 0.0f ? x / repetition[row] : x * repetition[row];
        out[i] = x - frequency[row] * (float)count - (count > 0 ? presence[row] : 0.0f);
    }
}

// Token sampling with no host sync and no sort: greedy argmax, or temperature
// softmax -> top-k -> top-p -> min-p (ties at every threshold kept, as
// numpy_ops.filter_probs) -> exponential race argmax p_i / E_i with
// E_i = -log(u_i) from the SplitMix64 stream of (seed, offset), bit for bit the
// noise of sampling_rng.py.
//
// A row is taken by one thread-block cluster (SAMPLE_CLUSTER blocks on sm_90,
// one block before it), each block a slice of the vocabulary; the blocks combine
// their partial results through distributed shared memory, in rank order, so
// every block reaches the same bits and the same decisions. Probabilities are
// recomputed from the logits on every pass: no scratch memory.
//
// Thresholds come from a radix select over the logits' order-preserving keys,
// 8 bits a pass (2 passes for bf16, 3 for fp16, 4 for fp32): the probability
// is a non-decreasing function f of the logit, so the k-th largest probability
// is f(k-th largest logit), and the top-p floor is f(the largest logit t whose
// mass at or above t reaches top_p). Counts and masses are summed as integers
// (mass in units of 2^-40), so the sums do not depend on the order of the adds.
// Launch with blockDim.x a multiple of 32 and at least 256. The penalties that
// may precede sampling are here too.

#define PROMPT_SEEN (1 << 30)
#define SAMPLE_CLUSTER 8
#define SAMPLE_BINS 256

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define SAMPLE_CLUSTER_DIMS __cluster_dims__(SAMPLE_CLUSTER, 1, 1)
__device__ __forceinline__ unsigned int cluster_rank() {
    unsigned int r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}
__device__ __forceinline__ unsigned int cluster_blocks() {
    unsigned int n;
    asm volatile("mov.u32 %0, %%cluster_nctarank;" : "=r"(n));
    return n;
}
// Every thread of every block of the cluster: shared-memory writes before it are
// visible to every block after it.
__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}
// The same shared variable in block `rank` of this cluster.
template <typename V>
__device__ __forceinline__ const V* cluster_peer(const V* local, unsigned int rank) {
    unsigned long long peer;
    asm volatile("mapa.u64 %0, %1, %2;" : "=l"(peer) : "l"(local), "r"(rank));
    return reinterpret_cast<const V*>(peer);
}
#else
#define SAMPLE_CLUSTER_DIMS
__device__ __forceinline__ unsigned int cluster_rank() { return 0; }
__device__ __forceinline__ unsigned int cluster_blocks() { return 1; }
__device__ __forceinline__ void cluster_sync() { __syncthreads(); }
template <typename V>
__device__ __forceinline__ const V* cluster_peer(const V* local, unsigned int) { return local; }
#endif

// The blocks' values (each the same in all its threads) folded in rank order; every thread gets it.
template <typename V, typename F>
__device__ V cluster_fold(V v, F&& fold) {
    __shared__ V slot;
    if (threadIdx.x == 0) slot = v;
    cluster_sync();
    V out = *cluster_peer(&slot, 0);
    for (unsigned int r = 1; r < cluster_blocks(); ++r) out = fold(out, *cluster_peer(&slot, r));
    cluster_sync();  // no block writes its slot again before every block has read it
    return out;
}

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
        e[0] = __uint_as_float(w.x), e[1] = __uint_as_float(w.y);
        e[2] = __uint_as_float(w.z), e[3] = __uint_as_float(w.w);
    }
}

// f(i, logit) for each logit i of this block's slice of the row (the cluster's blocks split it in
// rank order). A row of 16-byte vectors (vocab a multiple of a vector, 16-byte aligned) is read
// LOGIT_LOADS vectors at a time, all loaded before any is used; one logit at a time, each pass
// waited a round trip a logit. Which thread takes which logit differs between the two.
#define LOGIT_LOADS 4
template <typename T, typename F>
__device__ __forceinline__ void for_each_logit(const T* x, int vocab, F&& f) {
    constexpr int E = 16 / sizeof(T);
    const int rank = cluster_rank(), blocks = cluster_blocks(), threads = blockDim.x;
    if (vocab % E == 0 && (reinterpret_cast<unsigned long long>(x) & 15) == 0) {
        const uint4* xv = reinterpret_cast<const uint4*>(x);
        const int vecs = vocab / E, share = (vecs + blocks - 1) / blocks;
        const int end = min(vecs, (rank + 1) * share);
        for (int v0 = rank * share + threadIdx.x; v0 < end; v0 += LOGIT_LOADS * threads) {
            uint4 w[LOGIT_LOADS];
#pragma unroll
            for (int u = 0; u < LOGIT_LOADS; ++u)
                if (v0 + u * threads < end) w[u] = xv[v0 + u * threads];
#pragma unroll
            for (int u = 0; u < LOGIT_LOADS; ++u) {
                const int v = v0 + u * threads;
                if (v >= end) break;
                float e[E];
                unpack_logits<T>(w[u], e);
#pragma unroll
                for (int j = 0; j < E; ++j) f(v * E + j, e[j]);
            }
        }
        return;
    }
    const int share = (vocab + blocks - 1) / blocks, end = min(vocab, (rank + 1) * share);
    for (int i = rank * share + threadIdx.x; i < end; i += threads) f(i, to_f(x[i]));
}

__device__ __forceinline__ ArgMax cluster_argmax(ArgMax best) {
    best = cluster_fold(block_argmax(best), [](ArgMax a, ArgMax b) { return better(a, b); });
    if (best.index == 0x7fffffff) best.index = 0;
    return best;
}

template <typename T>
__device__ int row_argmax(const T* x, int vocab) {
    ArgMax best = {-SHARDLINE_INF, 0x7fffffff};
    for_each_logit(x, vocab, [&](int i, float logit) { best = better(best, ArgMax{logit, i}); });
    return cluster_argmax(best).index;
}

template <typename T>
__device__ RowSoftmax row_softmax(const T* x, int vocab, float temperature) {
    // max(logit / T) is (max logit) / T: a correctly rounded division by T > 0 keeps order
    float m = -SHARDLINE_INF;
    for_each_logit(x, vocab, [&](int, float logit) { m = fmaxf(m, logit); });
    m = cluster_fold(block_max(m), [](float a, float b) { return fmaxf(a, b); });
    RowSoftmax sm = {temperature, m / temperature, 0.0f};
    float s = 0.0f;
    for_each_logit(x, vocab, [&](int, float logit) { s += expf(logit / temperature - sm.max_scaled); });
    sm.sum_exp = cluster_fold(block_sum(s), [](float a, float b) { return a + b; });
    return sm;
}

// A logit's key: unsigned order is the floats' order (negatives flipped, positives' sign set).
__device__ __forceinline__ unsigned int logit_key(float logit) {
    const unsigned int u = __float_as_uint(logit);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The logit of a key whose top `bits` are `prefix`: the low bits are what a T widened to float
// has there (zeros in a positive float, so ones in a negative one's key).
__device__ __forceinline__ float key_logit(unsigned int prefix, int bits) {
    unsigned int key = bits == 32 ? prefix : prefix << (32 - bits);
    if (bits < 32 && !(key & 0x80000000u)) key |= (1u << (32 - bits)) - 1u;
    return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

// Bits of the key a T fills: fp32's 32, bf16's 16, fp16's 19 (within 24).
template <typename T> struct KeyBits { static constexpr int value = 32; };
template <> struct KeyBits<__nv_bfloat16> { static constexpr int value = 16; };
template <> struct KeyBits<__half> { static constexpr int value = 24; };

// Inclusive sum of the bins from the top (bin SAMPLE_BINS - 1) down to bin t, for t < SAMPLE_BINS.
__device__ unsigned long long bins_from_top(unsigned long long total) {
    __shared__ unsigned long long warp_totals[SAMPLE_BINS / 32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, groups = SAMPLE_BINS / 32;
    // thread t holds bin t; scanning from the top is a prefix scan of lanes in reverse
    unsigned long long s = total;
    for (int o = 1; o < 32; o <<= 1) {
        const unsigned long long above = __shfl_down_sync(0xffffffffu, s, o);
        if (lane + o < 32) s += above;
    }
    __syncthreads();
    if (lane == 0 && warp < groups) warp_totals[warp] = s;
    __syncthreads();
    for (int w = warp + 1; w < groups; ++w) s += warp_totals[w];
    return s;
}

// The logit of the largest key (KeyBits<T> bits) whose weight, summed over the logits with a key at or
// above it, reaches the target: target_of(total weight of the row) >= 1. weight(logit) is a logit's
// integer weight (1 counts logits; a probability in units of 2^-40 sums mass).
template <typename T, typename W, typename Target>
__device__ float radix_select(const T* x, int vocab, W&& weight, Target&& target_of) {
    // a bin's weight in two 32-bit sums (native shared atomics; 64-bit ones spin on a CAS):
    // the weights' low 14 bits (no carry out below 2^18 logits a block) and the rest
    __shared__ unsigned int hist_low[SAMPLE_BINS], hist_high[SAMPLE_BINS];
    __shared__ unsigned int chosen;
    __shared__ unsigned long long chosen_above;
    constexpr int BITS = KeyBits<T>::value;
    unsigned int prefix = 0;
    unsigned long long above = 0, target = 0;  // weight of the keys above the prefix; the goal
    for (int done = 0; done < BITS; done += 8) {
        for (int t = threadIdx.x; t < SAMPLE_BINS; t += blockDim.x) hist_low[t] = 0, hist_high[t] = 0;
        __syncthreads();
        const int shift = 32 - done - 8;
        for_each_logit(x, vocab, [&](int, float logit) {
            const unsigned int key = logit_key(logit);
            if (done == 0 || (key >> (32 - done)) == prefix) {
                const unsigned long long w = weight(logit);
                const int bin = (key >> shift) & (SAMPLE_BINS - 1);
                if (w & 0x3fffu) atomicAdd(&hist_low[bin], (unsigned int)(w & 0x3fffu));
                if (w >> 14) atomicAdd(&hist_high[bin], (unsigned int)(w >> 14));
            }
        });
        cluster_sync();
        unsigned long long total = 0;
        if (threadIdx.x < SAMPLE_BINS)
            for (unsigned int r = 0; r < cluster_blocks(); ++r)
                total += cluster_peer(hist_low, r)[threadIdx.x] +
                         ((unsigned long long)cluster_peer(hist_high, r)[threadIdx.x] << 14);
        cluster_sync();  // every block has read every hist before any clears its own
        const unsigned long long from_top = bins_from_top(total);
        if (done == 0) {
            if (threadIdx.x == 0) chosen_above = target_of(from_top);  // bin 0's sum: the row's weight
            __syncthreads();
            target = chosen_above;
            __syncthreads();
        }
        // exactly one bin t has above + from_top[t] >= target > above + from_top[t + 1]
        if (threadIdx.x < SAMPLE_BINS && above + from_top >= target && above + from_top - total < target) {
            chosen = threadIdx.x;
            chosen_above = above + from_top - total;
        }
        __syncthreads();
        prefix = (prefix << 8) | chosen;
        above = chosen_above;
        __syncthreads();
    }
    return key_logit(prefix, BITS);
}

#define MASS_UNIT 0x1p40f  // probabilities summed in units of 2^-40

template <typename T>
__device__ float kth_largest_prob(const T* x, int vocab, const RowSoftmax& sm, int k) {
    const float kth = radix_select(x, vocab, [](float) { return 1ull; },
                                   [k](unsigned long long) { return (unsigned long long)k; });
    return logit_prob(kth, sm);
}

template <typename T>
__device__ float nucleus_floor(const T* x, int vocab, const RowSoftmax& sm, float kept_floor, float top_p) {
    // f(the largest logit t whose mass, over logits >= t kept by top-k, reaches top_p of the kept
    // mass): the smallest probability of the shortest prefix (in descending order) whose mass
    // reaches top_p, i.e. desc[cut] of filter_probs. A target of at least one unit keeps the
    // argmax for top_p <= 0 (filter_probs' cut = 0).
    const float t = radix_select(
        x, vocab,
        [&](float logit) {
            const float p = logit_prob(logit, sm);
            return p >= kept_floor ? __float2ull_rn(p * MASS_UNIT) : 0ull;
        },
        [top_p](unsigned long long kept) {
            const double goal = ceil((double)top_p * (double)kept);
            return goal < 1.0 ? 1ull : (unsigned long long)goal;
        });
    return fmaxf(logit_prob(t, sm), kept_floor);
}

template <typename T>
__device__ int exponential_race(const T* x, int vocab, const RowSoftmax& sm, float floor_prob,
                                unsigned long long seed, long long offset) {
    const unsigned long long base = rng_base(seed, offset);
    ArgMax best = {-SHARDLINE_INF, 0x7fffffff};
    for_each_logit(x, vocab, [&](int i, float logit) {
        const float p = logit_prob(logit, sm);
        // a filtered logit scores 0 without drawing its noise
        best = better(best, ArgMax{p >= floor_prob ? p / -logf(rng_uniform(base, i)) : 0.0f, i});
    });
    return cluster_argmax(best).index;
}

template <typename T>
__global__ void __launch_bounds__(512, 2) SAMPLE_CLUSTER_DIMS
sample_kernel(const T* logits, int vocab, const float* temperature, const int* top_k, const float* top_p,
              const unsigned long long* seeds, const long long* offsets, const float* min_p, int* out, int rows,
              const long long* publish) {
    // publish, if not null: a device word holding a host address (pinned memory) where the tokens
    // go too, if it is not 0 (a captured decode step's, so its tokens need no copy to the host).
    pdl_begin();
    const int row = blockIdx.x / cluster_blocks();
    if (row >= rows) return;  // a grid counted in other than this build's clusters: a cluster's blocks all leave
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
    if (threadIdx.x == 0 && cluster_rank() == 0) {
        out[row] = token;
        int* host = publish != nullptr ? reinterpret_cast<int*>(*publish) : nullptr;
        if (host != nullptr) host[row] = token;
    }
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

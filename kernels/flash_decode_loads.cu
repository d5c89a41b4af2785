// flash_decode.cu's copies from the paged cache, compiled in front of it (cuda_common._PRELUDES):
// the trace hooks, the K/V loader, the block-table entries read ahead and the prologue that starts
// the copies before the dependent-launch wait. Helpers keep the kernel body's machine code as
// flash_decode.cu's note says (scripts/sass-diff flash_decode).

// bench/flash_decode_trace.py builds flash_decode.cu with FLASH_DECODE_TRACE: thread 0 of each block
// then records clock64 at its phases (slots 0-6), globaltimer at its start and end (8, 9), what
// the block was (10: 0 past the last tile, 1 a tile, 2 a split without keys) and its SM (11).
// Otherwise FLASH_TRACE is nothing.
#ifdef FLASH_DECODE_TRACE
#define FLASH_TRACE_SLOTS 12
__device__ unsigned long long flash_decode_trace[FLASH_DECODE_TRACE * FLASH_TRACE_SLOTS];
__device__ __forceinline__ void flash_trace_put(int slot, unsigned long long value) {
    const unsigned long long block = blockIdx.x + (unsigned long long)gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    if (threadIdx.x == 0 && block < FLASH_DECODE_TRACE) flash_decode_trace[block * FLASH_TRACE_SLOTS + slot] = value;
}
__device__ __forceinline__ unsigned long long flash_globaltimer() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
__device__ __forceinline__ unsigned flash_smid() {
    unsigned id;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(id));
    return id;
}
#define FLASH_TRACE(slot) flash_trace_put(slot, clock64())
#define FLASH_TRACE_VALUE(slot, value) flash_trace_put(slot, value)
#else
#define FLASH_TRACE(slot)
#define FLASH_TRACE_VALUE(slot, value)
#endif

// Copies key tiles, K and V, from the paged cache into this warp's STAGES stages of shared memory
// by cp.async; the caller commits and waits.
template <typename T, int D, int BK, int STAGES>
struct FdKvLoader {
    static constexpr int LD = D + 8, VECS = D / 8;
    // Each lane copies 16 bytes of a row at a time: column lc of rows lr0, lr0 + STEP, ... of a
    // tile when a warp covers whole rows (D = 16, 32, 64, 128: only the key's cache row changes
    // a copy), else columns and rows computed a copy (D = 80, 96).
    static constexpr int STEP = 32 % VECS == 0 ? 32 / VECS : 0;
    const FlashDivisor per_block;
    T* stages;  // this warp's [STAGES][K|V][BK][LD]
    int lane, lr0, lc;
    const char *k_base, *v_base;
    unsigned row_bytes, stage0;  // stage0: shared address of column lc of row lr0 in stage 0
    const int* table;
    int block_size, k_lo, k_hi, t_end;

    __device__ __forceinline__ FdKvLoader(const T* k_cache, const T* v_cache, const int* const& table_,
                                          int block_size_, const int& kv_head, const long long& kv_stride,
                                          const int& kw, const int& lane_, const FlashRange& range)
        : per_block(block_size_) {
        extern __shared__ __align__(128) unsigned char smem[];
        T* const stages_ = reinterpret_cast<T*>(smem) + kw * (STAGES * 2 * BK * LD);
        const int lr0_ = STEP ? lane_ / VECS : 0, lc_ = STEP ? (lane_ % VECS) * 8 : 0;
        const char* k_base_ = reinterpret_cast<const char*>(k_cache + (long long)kv_head * D + lc_);
        const char* v_base_ = reinterpret_cast<const char*>(v_cache + (long long)kv_head * D + lc_);
        const unsigned row_bytes_ = (unsigned)kv_stride * sizeof(T);
        stages = stages_, lane = lane_, lr0 = lr0_, lc = lc_, k_base = k_base_, v_base = v_base_;
        row_bytes = row_bytes_, table = table_, block_size = block_size_;
        k_lo = range.k_lo, k_hi = range.k_hi, t_end = range.t_end;
        stage0 = smem_u32(stages + lr0 * LD + lc);   // last: see above
    }

    // The cache row (block * block_size + offset) of key k_lo + t * BK + lane % BK, 0 past the
    // keys: looked up a tile before the loads that need it, which take it by shuffle.
    __device__ __forceinline__ int cache_row(int t) const {
        const int j = k_lo + t * BK + lane % BK;
        if (t >= t_end || j >= k_hi) return 0;
        const int blk = per_block.div(j);
        return __ldg(table + blk) * block_size + (j - blk * block_size);
    }

    // cache_row(t) from `entry`, its key's table entry read before the range (FdTableAhead).
    __device__ __forceinline__ int cache_row_at(int t, int entry) const {
        const int j = k_lo + t * BK + lane % BK;
        if (t >= t_end || j >= k_hi) return 0;
        return entry * block_size + (j - per_block.div(j) * block_size);
    }

    // Key tile t into stage `stage`; rows: this lane's cache_row(t).
    __device__ __forceinline__ void load(int t, int stage, int rows) const {
        const int left = k_hi - (k_lo + t * BK);   // keys of the tile that exist
        if constexpr (STEP > 0) {
            const unsigned ks = stage0 + stage * 2 * BK * LD * sizeof(T), vs = ks + BK * LD * sizeof(T);
#pragma unroll
            for (int k = 0; k < BK / STEP; ++k) {
                const int r = lr0 + k * STEP;
                const unsigned long long off = (unsigned long long)(unsigned)__shfl_sync(0xffffffffu, rows, r)
                                               * row_bytes;
                cp_async16_at(ks + k * STEP * LD * sizeof(T), k_base + off, r < left);
                cp_async16_at(vs + k * STEP * LD * sizeof(T), v_base + off, r < left);
            }
        } else {
            T* ks = stages + stage * 2 * BK * LD;
            T* vs = ks + BK * LD;
#pragma unroll
            for (int i = lane; i < BK * VECS; i += 32) {   // BK * VECS is a multiple of 32
                const int r = i / VECS, c = (i % VECS) * 8;
                const unsigned long long off = (unsigned long long)(unsigned)__shfl_sync(0xffffffffu, rows, r)
                                               * row_bytes + c * sizeof(T);
                cp_async16(ks + r * LD + c, k_base + off, r < left);
                cp_async16(vs + r * LD + c, v_base + off, r < left);
            }
        }
    }
};

// The block-table entries of a warp's first STAGES tiles of its split (the prologue's and the one
// after), read together with seq_lens, one round trip before the dependent-launch wait instead of
// two: they guess that the split starts at tile split * min_split_tiles from key 0. That holds
// for split 0 whenever its keys start at 0 (no window cut them), and for later splits where
// each has min_split_tiles tiles: contexts of at most num_splits * min_split_tiles tiles
// (flash_range). `hit` says whether the guess held; guesses past the table's row read its last
// slot (never used: no key is there). Off (`on` false: the launch's table_ahead, an A/B switch,
// or a table of no columns) it reads nothing and never hits.
template <int BK, int STAGES, int KW>
struct FdTableAhead {
    int entry[STAGES];
    bool on, hit;
    __device__ __forceinline__ FdTableAhead(const int* table, int max_blocks, const FlashDivisor& per_block,
                                            int split, int min_split_tiles, int kw, int lane, bool on_)
        : on(on_), hit(false) {
        const int t0 = split * min_split_tiles + kw;
#pragma unroll
        for (int s = 0; s < STAGES; ++s)
            entry[s] = on ? __ldg(table + max(0, min(per_block.div((t0 + s * KW) * BK + lane % BK), max_blocks - 1)))
                          : 0;
    }
    // Whether the guess held, once the split's range is known.
    __device__ __forceinline__ void settle(const FlashRange& range, int split, int min_split_tiles) {
        hit = on && range.k_lo == 0 && range.t_begin == split * min_split_tiles;
    }
    // entry[s] for a runtime s, by selects (an indexed array would live in local memory)
    __device__ __forceinline__ int at(int s) const {
        int e = entry[0];
#pragma unroll
        for (int i = 1; i < STAGES; ++i) e = s == i ? entry[i] : e;
        return e;
    }
    // kv's cache row of tile t, the warp's s-th: from the entry read ahead where the guess held
    // (the prologue's `ahead` spells it out with entry[STAGES - 1]: through at(), nvcc orders
    // the prologue otherwise)
    template <typename Kv>
    __device__ __forceinline__ int cache_row(const Kv& kv, int t, int s) const {
        return hit ? kv.cache_row_at(t, at(s)) : kv.cache_row(t);
    }
};

// One commit group per tile slot, empty past the last tile (as in flash_attention.cu), here for
// the first STAGES - 1 slots from tile t. Their tiles go before the wait for the kernel before
// while they hold no new key (as in a decode step). Returns the cache rows of the next tile.
// The rows come from the table entries read ahead where their guess held (ta.hit).
template <typename T, int D, int BK, int STAGES, int KW>
__device__ __forceinline__ int fd_prologue(const FdKvLoader<T, D, BK, STAGES>& kv, const FlashRange& range,
                                           const int& t_, const FdTableAhead<BK, STAGES, KW>& ta) {
    const int t = t_, k_lo = range.k_lo, first_pos = range.first_pos, t_end = range.t_end;
    int st = 0;
    for (; st < STAGES - 1 && k_lo + (t + st * KW + 1) * BK <= first_pos; ++st) {
        if (t + st * KW < t_end) kv.load(t + st * KW, st, ta.cache_row(kv, t + st * KW, st));
        asm volatile("cp.async.commit_group;\n" ::);
    }
    const int ahead = ta.hit ? kv.cache_row_at(t + (STAGES - 1) * KW, ta.entry[STAGES - 1])
                             : kv.cache_row(t + (STAGES - 1) * KW);
    FLASH_TRACE(2);
    pdl_begin();
    FLASH_TRACE(3);
    for (; st < STAGES - 1; ++st) {
        if (t + st * KW < t_end) kv.load(t + st * KW, st, ta.cache_row(kv, t + st * KW, st));
        asm volatile("cp.async.commit_group;\n" ::);
    }
    return ahead;
}

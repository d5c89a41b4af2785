// Pieces of the prefill kernels on Hopper's warpgroup mma (wgmma, sm_90a): flash_prefill_sm90.cu
// (every thread loads and computes) and flash_prefill_sm90_ws.cu (a producer warpgroup loads,
// two compute). Compiled after flash_common.cu and flash_attention.cu, in front of each.
//
// Shared memory holds Q, K and V tiles in the 128-byte swizzled layout of wgmma's canonical
// forms: a tile of R rows and D columns is D / 64 column blocks of R x 64 elements (R * 128 bytes
// each, 1024-byte aligned), row r of a block at r * 128 bytes with its 16-byte chunk c (0..7) at
// chunk c ^ (r % 8). The eight chunks a row brings from global memory (128 contiguous bytes)
// land in eight different bank groups. Q and K are K-major operands (their 8-row groups 1024
// bytes apart, a 16-column step 32 bytes into the block); V is N-major (N its dimensions: column
// blocks R * 128 bytes apart, 8-key groups 1024).

#define F9_WARPS 8
#define F9_THREADS (F9_WARPS * 32)
#define F9_BQ 128      // packed rows a block
#define F9_BK 64       // keys a tile
#define F9_STAGES 2    // K/V tiles in flight (cuda_common.flash_prefill_sm90_smem_bytes)
static_assert(F9_THREADS <= FA_MAX_THREADS, "flash_find_tile's scan takes FA_MAX_THREADS threads at most");

// Descriptor byte offsets (leading, stride): K-major operands (Q, K) stride 1024 bytes over
// 8-row groups, and their leading offset goes unused in a 128-byte swizzle (one mma's 16 columns
// stay inside a 128-byte row); N-major V (r: the tile's keys) leads over column blocks and
// strides over 8-key groups. F9_SWAP_K / F9_SWAP_V swap a pair: tests/test_kernels_gpu_sm90.py
// checks that either swap gives wrong results, so the test sees K's stride and both of V's.
#ifdef F9_SWAP_K
#define F9_K_OFFSETS 1024u, 16u
#else
#define F9_K_OFFSETS 16u, 1024u
#endif
#ifdef F9_SWAP_V
#define F9_V_OFFSETS(r) 1024u, (r) * 128u
#else
#define F9_V_OFFSETS(r) (r) * 128u, 1024u
#endif

// Byte offset of 16-byte chunk c (of D / 8) of row r in a swizzled tile of `rows` rows.
__device__ __forceinline__ unsigned f9_swizzled(int r, int c, int rows) {
    return (unsigned)((c >> 3) * rows * 128 + r * 128 + (((c & 7) ^ (r & 7)) << 4));
}

// A wgmma shared-memory matrix descriptor: start address, the leading and stride byte offsets,
// 128-byte swizzle (mode 1 in bits 62-63), base offset 0 (the blocks are 1024-byte aligned).
__device__ __forceinline__ unsigned long long f9_desc(unsigned addr, unsigned lead, unsigned stride) {
    return (unsigned long long)((addr & 0x3FFFFu) >> 4) | ((unsigned long long)(lead >> 4) << 16)
           | ((unsigned long long)(stride >> 4) << 32) | (1ull << 62);
}

// The 1024-byte aligned start of the dynamic shared memory (its size has 1 KiB to spare).
__device__ __forceinline__ unsigned f9_smem_base() {
    extern __shared__ __align__(128) unsigned char smem[];
    return (smem_u32(smem) + 1023u) & ~1023u;
}

__device__ __forceinline__ void f9_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void f9_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void f9_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }

// Keeps the compiler from moving reads or writes of accumulator registers across the asynchronous
// mma: each register passes through an empty asm after the wait (and before the issue).
template <int N>
__device__ __forceinline__ void f9_touch(float (&c)[N][4]) {
#pragma unroll
    for (int n = 0; n < N; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(c[n][e])::"memory");
}

#define F9_C4(c, i) "+f"(c[i][0]), "+f"(c[i][1]), "+f"(c[i][2]), "+f"(c[i][3])
#define F9_C32(c) F9_C4(c, 0), F9_C4(c, 1), F9_C4(c, 2), F9_C4(c, 3), F9_C4(c, 4), F9_C4(c, 5), F9_C4(c, 6), \
                  F9_C4(c, 7)
#define F9_C64(c) F9_C32(c), F9_C4(c, 8), F9_C4(c, 9), F9_C4(c, 10), F9_C4(c, 11), F9_C4(c, 12), F9_C4(c, 13), \
                  F9_C4(c, 14), F9_C4(c, 15)
#define F9_R32 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
               "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define F9_R64 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
               "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, " \
               "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, " \
               "%56, %57, %58, %59, %60, %61, %62, %63}"

// c (64 x N over the warpgroup, fp32) = a b + (accumulate ? c : 0): a 64 x 16 from registers (this
// warp's 16 rows as an mma.sync A fragment), b 16 x N from shared memory by descriptor, transposed
// (TRANS_B = 1: stored N-major) or not (K-major). The pointer argument picks the input type.
// The operand numbers past the accumulators are spelled out: asm takes only literals.
#define F9_WGMMA(N, REGS, OPS, T, PTX_TYPE, A0, A1, A2, A3, AC, B, TB)                                       \
    template <int TRANS_B>                                                                                    \
    __device__ __forceinline__ void f9_mma(float (&c)[N / 8][4], const unsigned (&a)[4], unsigned long long b, \
                                           int accumulate, const T*) {                                        \
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" AC ", 0;\n"                                          \
                     "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." PTX_TYPE "." PTX_TYPE " " REGS ", "     \
                     "{%" A0 ", %" A1 ", %" A2 ", %" A3 "}, %" B ", p, 1, 1, %" TB ";\n}\n"                    \
                     : OPS(c)                                                                                 \
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(accumulate), "l"(b), "n"(TRANS_B)      \
                     : "memory");                                                                             \
    }
// c (64 x 64 over the warpgroup, fp32) = a b + (accumulate ? c : 0), a 64 x 16 and b 16 x 64 both
// from shared memory by descriptor, K-major.
#define F9_WGMMA_SS(T, PTX_TYPE)                                                                             \
    __device__ __forceinline__ void f9_mma_ss(float (&c)[8][4], unsigned long long a, unsigned long long b,   \
                                              int accumulate, const T*) {                                     \
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                           \
                     "wgmma.mma_async.sync.aligned.m64n64k16.f32." PTX_TYPE "." PTX_TYPE " " F9_R32 ", "       \
                     "%32, %33, p, 1, 1, 0, 0;\n}\n"                                                          \
                     : F9_C32(c)                                                                              \
                     : "l"(a), "l"(b), "r"(accumulate)                                                        \
                     : "memory");                                                                             \
    }
F9_WGMMA_SS(__nv_bfloat16, "bf16")
F9_WGMMA_SS(__half, "f16")
#undef F9_WGMMA_SS

F9_WGMMA(64, F9_R32, F9_C32, __nv_bfloat16, "bf16", "32", "33", "34", "35", "36", "37", "38")
F9_WGMMA(64, F9_R32, F9_C32, __half, "f16", "32", "33", "34", "35", "36", "37", "38")
F9_WGMMA(128, F9_R64, F9_C64, __nv_bfloat16, "bf16", "64", "65", "66", "67", "68", "69", "70")
F9_WGMMA(128, F9_R64, F9_C64, __half, "f16", "64", "65", "66", "67", "68", "69", "70")
#undef F9_WGMMA

// The block's Q rows into the swizzled layout at the start of shared memory by cp.async, copied
// by THREADS threads (tid < THREADS), zero for padding rows; the caller commits and waits.
template <typename T, int D, int THREADS = F9_THREADS>
__device__ __forceinline__ void f9_stage_q(const T* q, const FlashRange& range, int group, int num_heads,
                                           int kv_head, int tid) {
    const int c = tid % (D / 8), r0 = tid / (D / 8);
    const unsigned dst = f9_smem_base() + f9_swizzled(r0, c, F9_BQ);
#pragma unroll
    for (int k = 0; k < F9_BQ * D / 8 / THREADS; ++k) {
        const int r = r0 + k * (THREADS / (D / 8)), packed = range.row0 + r;
        const bool ok = r < range.rows_here;
        const long long row = ok ? (long long)(range.q_first + packed / group) * num_heads
                                       + (long long)kv_head * group + packed % group : 0;
        cp_async16_at(dst + k * (THREADS / (D / 8)) * 128, q + row * D + c * 8, ok);
    }
}

// Copies key tiles, K and V, from the paged cache into the swizzled stages (each K then V, after
// the block's Q) by cp.async, with THREADS threads; the caller commits and waits. Thread tid
// copies 16-byte chunk tid % (D / 8) of rows tid / (D / 8), then every ROW_STEP rows on: eight
// threads in a row bring 128 contiguous bytes of it.
template <typename T, int D, int THREADS = F9_THREADS>
struct F9KvLoader {
    static constexpr int CHUNKS = F9_BK * D / 8 / THREADS, ROW_STEP = THREADS / (D / 8);
    static constexpr unsigned TILE_BYTES = F9_BK * D * sizeof(T);
    const FlashDivisor per_block;
    const char *k_base, *v_base;
    unsigned row_bytes, dst0;
    const int* table;
    int block_size, k_lo, k_hi, r0;

    __device__ __forceinline__ F9KvLoader(const T* k_cache, const T* v_cache, const int* table_, int block_size_,
                                          int kv_head, long long kv_stride, int tid, const FlashRange& range)
        : per_block(block_size_) {
        const int col = (tid % (D / 8)) * 8;
        r0 = tid / (D / 8);
        k_base = reinterpret_cast<const char*>(k_cache + (long long)kv_head * D + col);
        v_base = reinterpret_cast<const char*>(v_cache + (long long)kv_head * D + col);
        row_bytes = (unsigned)kv_stride * sizeof(T);
        dst0 = f9_smem_base() + F9_BQ * D * sizeof(T) + f9_swizzled(r0, col / 8, F9_BK);   // stages after Q
        table = table_, block_size = block_size_, k_lo = range.k_lo, k_hi = range.k_hi;
    }

    __device__ __forceinline__ void load(int t, int stage) const {  // key tile t into stage `stage`
        const int kb = k_lo + t * F9_BK;
        const unsigned ks = dst0 + stage * 2 * TILE_BYTES, vs = ks + TILE_BYTES;
#pragma unroll
        for (int k = 0; k < CHUNKS; ++k) {
            const int j = kb + r0 + k * ROW_STEP;
            const bool ok = j < k_hi;
            unsigned long long off = 0;
            if (ok) {
                const int blk = per_block.div(j);
                off = (unsigned long long)(unsigned)(__ldg(table + blk) * block_size + (j - blk * block_size))
                      * row_bytes;
            }
            cp_async16_at(ks + k * ROW_STEP * 128, k_base + off, ok);
            cp_async16_at(vs + k * ROW_STEP * 128, v_base + off, ok);
        }
    }
};

// What a warpgroup's 64 rows see: a key tile outside [k_lo, k_hi) is skipped by all of its warps
// together (wgmma runs a warpgroup at once); a warp whose own rows miss a seen tile masks it.
struct F9GroupKeys {
    bool busy;
    int k_lo, k_hi;
};
__device__ __forceinline__ F9GroupKeys f9_group_keys(const FlashRange& range, int wg, int group, int window) {
    const int wrow = wg * 64, last = min(wrow + 63, range.rows_here - 1);
    F9GroupKeys k;
    k.busy = wrow < range.rows_here;
    k.k_hi = range.first_pos + (range.row0 + last) / group + 1;
    k.k_lo = window > 0 ? max(0, range.first_pos + (range.row0 + wrow) / group - window + 1) : 0;
    return k;
}

// Issues s = Q K^T for a warpgroup's 64 rows (Q at qs, K at ks), committed as one group.
template <typename T, int D>
__device__ __forceinline__ void f9_scores(float (&s)[F9_BK / 8][4], unsigned qs, unsigned ks) {
    const T* tag = nullptr;
#pragma unroll
    for (int c = 0; c < F9_BK / 8; ++c) s[c][0] = s[c][1] = s[c][2] = s[c][3] = 0.0f;
    f9_touch(s);
    f9_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)   // columns kk * 16..: block kk / 4, 32 bytes a step into it
        f9_mma_ss(s, f9_desc(qs + (kk >> 2) * F9_BQ * 128 + (kk & 3) * 32, F9_K_OFFSETS),
                  f9_desc(ks + (kk >> 2) * F9_BK * 128 + (kk & 3) * 32, F9_K_OFFSETS), kk > 0, tag);
    f9_commit();
}

// The probabilities s, rounded to the storage type, as P's A fragments.
template <typename T>
__device__ __forceinline__ void f9_pack(unsigned (&pa)[F9_BK / 16][4], const float (&s)[F9_BK / 8][4]) {
    const T* tag = nullptr;
#pragma unroll
    for (int kk = 0; kk < F9_BK / 16; ++kk) {
        pa[kk][0] = pack2(s[2 * kk][0], s[2 * kk][1], tag);
        pa[kk][1] = pack2(s[2 * kk][2], s[2 * kk][3], tag);
        pa[kk][2] = pack2(s[2 * kk + 1][0], s[2 * kk + 1][1], tag);
        pa[kk][3] = pack2(s[2 * kk + 1][2], s[2 * kk + 1][3], tag);
    }
}

// Issues o += P V (P from registers, V at vs), committed as one group; `fence`: registers of o or
// P were written since the last wgmma.fence.
template <typename T, int D>
__device__ __forceinline__ void f9_pv(float (&o)[D / 8][4], const unsigned (&pa)[F9_BK / 16][4], unsigned vs,
                                      bool fence) {
    const T* tag = nullptr;
    if (fence) f9_fence();
#pragma unroll
    for (int kk = 0; kk < F9_BK / 16; ++kk)   // keys kk * 16..: rows 16 kk.. of every column block
        f9_mma<1>(o, pa[kk], f9_desc(vs + kk * 16 * 128, F9_V_OFFSETS(F9_BK)), 1, tag);
    f9_commit();
}

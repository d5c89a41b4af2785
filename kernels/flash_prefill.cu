// flash_prefill_kernel: the prefill shape with two 16-row m-tiles a warp (CudaOps
// prefill_rows_per_warp = 32). Compiled after flash_common.cu and flash_attention.cu, whose tile
// shape (FaShape, KW = 1), rows, key ranges, K/V loader and row writes it uses; its launch takes
// flash_attention_kernel's arguments, grid and block order (flash_block_tile).
//
// 4 warps own 128 packed rows and share every 64-key tile, as KW = 1 does with 64, but each K and
// V fragment read from shared memory feeds both m-tiles' mma: 5/8 of the shared-memory reads an
// mma (Q is re-read a tile). The warp's Q rows wait in shared memory (after the K/V stages,
// FP_Q_ROWS rows of LD a warp) and come by ldmatrix a 16-dimension step, so the two tiles' output
// rows, scores and statistics fit the registers (FlashAttention-2 keeps Q so too).

#define FP_MT 2
#define FP_Q_ROWS (16 * FP_MT)

// The warp's Q rows into its shared-memory rows, zero for padding rows.
template <typename T, int D>
__device__ __forceinline__ void fp_stage_q(T* qs, const T* q, const FlashRange& range, int wrow, int group,
                                           int num_heads, int kv_head, int lane) {
    constexpr int VECS = D / 8, LD = D + 8;
    for (int i = lane; i < FP_Q_ROWS * VECS; i += 32) {
        const int r = i / VECS, c = (i % VECS) * 8, packed = range.row0 + wrow + r;
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (wrow + r < range.rows_here) {
            const long long row = (long long)(range.q_first + packed / group) * num_heads + (long long)kv_head * group
                                  + packed % group;
            v = *reinterpret_cast<const uint4*>(q + row * D + c);
        }
        *reinterpret_cast<uint4*>(qs + r * LD + c) = v;
    }
    __syncwarp();
}

// Raw scores of both m-tiles against the key tile at ks: s[mt][n] holds keys n * 8 .. n * 8 + 7.
template <typename T, int D>
__device__ __forceinline__ void fp_scores(float (&s)[FP_MT][FaShape<D, 1>::NT][4], const T* qs, const T* ks,
                                          int lane) {
    constexpr int LD = D + 8, NT = FaShape<D, 1>::NT;
    const int mi = lane >> 3, mr = lane & 7;
    const T* tag = nullptr;
#pragma unroll
    for (int mt = 0; mt < FP_MT; ++mt)
#pragma unroll
        for (int n = 0; n < NT; ++n) s[mt][n][0] = s[mt][n][1] = s[mt][n][2] = s[mt][n][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        unsigned qa[FP_MT][4];   // rows mt * 16 + (lane % 16), dims kk * 16 + (lane / 16) * 8: a0..a3
#pragma unroll
        for (int mt = 0; mt < FP_MT; ++mt)
            ldmatrix_x4(qa[mt], qs + (mt * 16 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8);
#pragma unroll
        for (int np = 0; np < NT / 2; ++np) {
            unsigned kf[4];  // keys (2np + mi/2) * 8 + mr, dims kk * 16 + (mi % 2) * 8
            ldmatrix_x4(kf, ks + ((2 * np + (mi >> 1)) * 8 + mr) * LD + kk * 16 + (mi & 1) * 8);
#pragma unroll
            for (int mt = 0; mt < FP_MT; ++mt) {
                mma16816(s[mt][2 * np], qa[mt], kf[0], kf[1], tag);
                mma16816(s[mt][2 * np + 1], qa[mt], kf[2], kf[3], tag);
            }
        }
    }
}

// o[mt] += P[mt] V for the V tile at vs, each V fragment feeding both m-tiles.
template <typename T, int D>
__device__ __forceinline__ void fp_accumulate_pv(float (&o)[FP_MT][D / 8][4],
                                                 const float (&s)[FP_MT][FaShape<D, 1>::NT][4], const T* vs, int lane) {
    constexpr int LD = D + 8, BK = FaShape<D, 1>::BK;
    const int mi = lane >> 3, mr = lane & 7;
    const T* tag = nullptr;
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
        unsigned pa[FP_MT][4];
#pragma unroll
        for (int mt = 0; mt < FP_MT; ++mt) {
            pa[mt][0] = pack2(s[mt][2 * kk][0], s[mt][2 * kk][1], tag);
            pa[mt][1] = pack2(s[mt][2 * kk][2], s[mt][2 * kk][3], tag);
            pa[mt][2] = pack2(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1], tag);
            pa[mt][3] = pack2(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3], tag);
        }
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
            unsigned vf[4];  // keys kk * 16 + (mi % 2) * 8 + mr, dims dp * 16 + (mi / 2) * 8
            ldmatrix_x4_trans(vf, vs + (kk * 16 + (mi & 1) * 8 + mr) * LD + dp * 16 + (mi >> 1) * 8);
#pragma unroll
            for (int mt = 0; mt < FP_MT; ++mt) {
                mma16816(o[mt][2 * dp], pa[mt], vf[0], vf[1], tag);
                mma16816(o[mt][2 * dp + 1], pa[mt], vf[2], vf[3], tag);
            }
        }
    }
}

// The block's key tiles through the shared-memory stages, as fa_key_loop's KW = 1 path, for both
// m-tiles: a tile neither sees is skipped. Leaves o, m and l final, l summed over the row.
template <typename T, int D>
__device__ __forceinline__ void fp_key_loop(float (&o)[FP_MT][D / 8][4], float (&m)[FP_MT][2], float (&l)[FP_MT][2],
                                            const FaKvLoader<T, D, 1>& kv, const T* qs, const FaRows (&w)[FP_MT],
                                            const FaWarpKeys (&wk)[FP_MT], const FlashRange& range, int lane,
                                            int window, float scale2) {
    using S = FaShape<D, 1>;
    constexpr int BK = S::BK, STAGES = S::STAGES, LD = S::LD;
    extern __shared__ __align__(128) unsigned char smem[];
    const int t4 = lane & 3, t_end = range.t_end;
    int t = range.t_begin;
#pragma unroll
    for (int st = 0; st < STAGES - 1; ++st) {
        if (t + st < t_end) kv.load(t + st, st);
        asm volatile("cp.async.commit_group;\n" ::);
    }
    for (int it = 0; t < t_end; ++it, ++t) {
        if (t + STAGES - 1 < t_end) kv.load(t + STAGES - 1, (it + STAGES - 1) % STAGES);
        asm volatile("cp.async.commit_group;\n" ::);
        asm volatile("cp.async.wait_group %0;\n" ::"n"(STAGES - 1));
        __syncthreads();
        const int kb = range.k_lo + t * BK;
        bool seen = false;
#pragma unroll
        for (int mt = 0; mt < FP_MT; ++mt) seen |= wk[mt].busy && kb < wk[mt].k_hi && kb + BK > wk[mt].k_lo;
        if (seen) {
            const T* ks = reinterpret_cast<const T*>(smem) + (it % STAGES) * 2 * BK * LD;
            float s[FP_MT][S::NT][4];
            fp_scores<T, D>(s, qs, ks, lane);
#pragma unroll
            for (int mt = 0; mt < FP_MT; ++mt) {
                float mx[2];
                fa_mask_max(s[mt], mx, w[mt], wk[mt], kb, range.k_hi, window, t4);
                flash_softmax_update<1>(s[mt], o[mt], m[mt], l[mt], mx, scale2);
            }
            fp_accumulate_pv<T, D>(o, s, ks + BK * LD, lane);
        }
        __syncthreads();  // the stage is free for the load STAGES - 1 tiles on
    }
    asm volatile("cp.async.wait_group 0;\n" ::);
#pragma unroll
    for (int mt = 0; mt < FP_MT; ++mt) flash_row_sums(l[mt]);
}

template <typename T, int D>
__global__ void __launch_bounds__(FA_THREADS, 2)
    flash_prefill_kernel(FLASH_PAGED_PARAMS) {
    pdl_begin();
    using S = FaShape<D, 1>;
    constexpr int BQ = FA_WARPS * FP_Q_ROWS;
    extern __shared__ __align__(128) unsigned char smem[];
    const int group = num_heads / num_kv_heads;
    const FlashBlock at = flash_block_start<T, D>(heads_first, query_start_loc, num_seqs, group, BQ, out, num_tokens,
                                                  num_heads);
    if (at.b < 0) return;
    const int b = at.b, split = blockIdx.z, target = at.target, kv_head = at.kv_head;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t4 = lane & 3;
    const FlashRange range = flash_range(query_start_loc, seq_lens, b, at.tile, BQ, S::BK, group, window, split,
                                         num_splits);
    FaRows w[FP_MT];
    FaWarpKeys wk[FP_MT];
#pragma unroll
    for (int mt = 0; mt < FP_MT; ++mt) {   // m-tile mt of warp `warp`: rows as 16-row warp 2 * warp + mt's
        w[mt] = fa_rows(range, warp * FP_Q_ROWS + mt * 16, g, group, num_heads, kv_head);
        wk[mt] = fa_warp_keys(range, FP_MT * warp + mt, group, window);
    }
    T* qs = reinterpret_cast<T*>(smem) + S::STAGES * 2 * S::BK * S::LD + warp * FP_Q_ROWS * S::LD;
    fp_stage_q<T, D>(qs, q, range, warp * FP_Q_ROWS, group, num_heads, kv_head, lane);

    float o[FP_MT][S::DT][4], m[FP_MT][2], l[FP_MT][2];
#pragma unroll
    for (int mt = 0; mt < FP_MT; ++mt) {
        for (int d = 0; d < S::DT; ++d) o[mt][d][0] = o[mt][d][1] = o[mt][d][2] = o[mt][d][3] = 0.0f;
        m[mt][0] = m[mt][1] = -SHARDLINE_INF;
        l[mt][0] = l[mt][1] = 0.0f;
    }
    const FaKvLoader<T, D, 1> kv(k_cache, v_cache, block_tables + (long long)b * max_blocks, block_size, kv_head,
                                 (long long)num_kv_heads * D, 0, tid, range);
    fp_key_loop<T, D>(o, m, l, kv, qs, w, wk, range, lane, window, scale * FA_LOG2E);

    const FlashSink<T, D> sink = {out, partial, num_heads, num_splits, split, num_splits};
#pragma unroll
    for (int mt = 0; mt < FP_MT; ++mt)   // rows looked up again: none of theirs stays live through the loop
        fa_write_rows<T, D>(sink, fa_rows(range, warp * FP_Q_ROWS + mt * 16, g, group, num_heads, kv_head), o[mt],
                            m[mt], l[mt], t4);
    if (num_splits > 1)
        flash_merge_splits<T, D>(partial, out, counters + (long long)target * gridDim.y + kv_head, num_splits,
                                 num_splits, range.rows_here, range.row0, group, range.q_first, num_heads, kv_head);
}

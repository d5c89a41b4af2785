// flash_prefill_sm90_kernel: the prefill shape on Hopper's warpgroup mma (wgmma, sm_90a; NVRTC
// builds this module for sm_90a alone, cuda_common._ARCH_MODULES). Compiled after flash_common.cu,
// flash_attention.cu (whose rows, key ranges, masks, online softmax and row writes it uses) and
// flash_sm90_common.cu (layouts, descriptors, wgmma, loads); its launch takes
// flash_attention_kernel's arguments and block order (flash_block_tile).
//
// 8 warps own 128 packed rows, two warpgroups of 64, and share every 64-key tile. The block's Q
// rows wait in shared memory beside the K/V stages; a warpgroup's 64 x 64 scores come from
// wgmma reading Q and K there, with no ldmatrix, one read of a K tile serving all 64 rows where
// mma.sync serves 16 or 32 (flash_attention.cu, flash_prefill.cu). A warp masks its 16 rows and
// updates their online softmax as flash_attention.cu does; the probabilities, rounded to the
// storage type, go back from registers as the A operand of P V, with V read from shared memory
// transposed by the instruction. Each mma group is waited for at once: the two blocks an SM
// overlap one's softmax with the other's mma.
//
// The block's key tiles through the stages: s = Q K^T by wgmma, mask and online softmax as
// flash_attention.cu's, o += P V by wgmma. Leaves o, m and l final, l summed over the row.
template <typename T, int D>
__device__ __forceinline__ void f9_key_loop(float (&o)[D / 8][4], float (&m)[2], float (&l)[2],
                                            const F9KvLoader<T, D>& kv, const FaRows& w, const FaWarpKeys& wk,
                                            const F9GroupKeys& gk, const FlashRange& range, int lane, int window,
                                            float scale2) {
    constexpr unsigned TILE = F9KvLoader<T, D>::TILE_BYTES;
    const unsigned qs = f9_smem_base() + (threadIdx.x >> 7) * 64 * 128;   // the warpgroup's 64 Q rows
    const unsigned base = f9_smem_base() + F9_BQ * D * sizeof(T);
    const int t4 = lane & 3, t_end = range.t_end;
    int t = range.t_begin;
#pragma unroll
    for (int st = 0; st < F9_STAGES - 1; ++st) {
        if (t + st < t_end) kv.load(t + st, st);
        asm volatile("cp.async.commit_group;\n" ::: "memory");
    }
    for (int it = 0; t < t_end; ++it, ++t) {
        if (t + F9_STAGES - 1 < t_end) kv.load(t + F9_STAGES - 1, (it + F9_STAGES - 1) % F9_STAGES);
        asm volatile("cp.async.commit_group;\n" ::: "memory");
        asm volatile("cp.async.wait_group %0;\n" ::"n"(F9_STAGES - 1) : "memory");
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");   // cp.async's writes, seen by wgmma
        __syncthreads();
        const int kb = range.k_lo + t * F9_BK;
        if (gk.busy && kb < gk.k_hi && kb + F9_BK > gk.k_lo) {
            const unsigned ks = base + (it % F9_STAGES) * 2 * TILE, vs = ks + TILE;
            float s[F9_BK / 8][4], mx[2];
            f9_scores<T, D>(s, qs, ks);
            f9_wait_all();
            f9_touch(s);
            fa_mask_max(s, mx, w, wk, kb, range.k_hi, window, t4);
            flash_softmax_update<1>(s, o, m, l, mx, scale2);
            unsigned pa[F9_BK / 16][4];
            f9_pack<T>(pa, s);
            f9_touch(o);
            f9_pv<T, D>(o, pa, vs, true);
            f9_wait_all();
            f9_touch(o);
        }
        __syncthreads();  // the stage is free for the load STAGES - 1 tiles on
    }
    asm volatile("cp.async.wait_group 0;\n" ::: "memory");
    flash_row_sums(l);
}

template <typename T, int D>
__global__ void __launch_bounds__(F9_THREADS, 2)
    flash_prefill_sm90_kernel(FLASH_PAGED_PARAMS) {
    pdl_begin();
    const int group = num_heads / num_kv_heads;
    const FlashBlock at = flash_block_start<T, D>(heads_first, query_start_loc, num_seqs, group, F9_BQ, out,
                                                  num_tokens, num_heads);
    if (at.b < 0) return;
    const int b = at.b, split = blockIdx.z, target = at.target, kv_head = at.kv_head;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t4 = lane & 3;
    const FlashRange range = flash_range(query_start_loc, seq_lens, b, at.tile, F9_BQ, F9_BK, group, window, split,
                                         num_splits);
    const FaRows w = fa_rows(range, warp * 16, g, group, num_heads, kv_head);
    const FaWarpKeys wk = fa_warp_keys(range, warp, group, window);
    const F9GroupKeys gk = f9_group_keys(range, warp >> 2, group, window);
    f9_stage_q<T, D>(q, range, group, num_heads, kv_head, tid);

    float o[D / 8][4], m[2] = {-SHARDLINE_INF, -SHARDLINE_INF}, l[2] = {0.0f, 0.0f};
#pragma unroll
    for (int d = 0; d < D / 8; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.0f;
    const F9KvLoader<T, D> kv(k_cache, v_cache, block_tables + (long long)b * max_blocks, block_size, kv_head,
                              (long long)num_kv_heads * D, tid, range);
    f9_key_loop<T, D>(o, m, l, kv, w, wk, gk, range, lane, window, scale * FA_LOG2E);

    const FlashSink<T, D> sink = {out, partial, num_heads, num_splits, split, num_splits};
    // the rows looked up again: none of theirs stays live through the loop
    fa_write_rows<T, D>(sink, fa_rows(range, warp * 16, g, group, num_heads, kv_head), o, m, l, t4);
    if (num_splits > 1)
        flash_merge_splits<T, D>(partial, out, counters + (long long)target * gridDim.y + kv_head, num_splits,
                                 num_splits, range.rows_here, range.row0, group, range.q_first, num_heads, kv_head);
}

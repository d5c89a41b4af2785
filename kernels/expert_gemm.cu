// One-row skinny GEMMs (skinny_gemm.cu, its prelude here) over an expert picked on the device:
// the MoE layer's few-token decode path reads only the experts its tokens chose, with no host
// sync (a CUDA graph replays it for any routing). w stacks the experts' weights, [E, rows, K]
// (gated: rows = 2N, gate rows then up rows); pair p = blockIdx.y computes
// y[p, :] = x[p % R, :] . w[experts[p]]^T (R = x's rows: slot s of token t is pair s * R + t, or
// each pair has its own row), silu(gate) * up where gated. experts[p] is the router's output,
// so it is read only after the kernel before ends (dependent launch); an id out of range (a NaN
// row's) reads the nearest expert, whose output the row's NaN weight then scales.
template <typename T, int KS>
__global__ void expert_skinny_gemm_kernel(const T* x, int x_rows, const T* w, const int* experts, int num_experts,
                                          long long expert_stride, T* y, int N, int K, int gated) {
    pdl_begin();
    const int pair = blockIdx.y, expert = min(max(experts[pair], 0), num_experts - 1);
    const T* xp = x + (long long)(pair % x_rows) * K;
    const T* wp = w + (long long)expert * expert_stride;
    skinny_tiles<T, 1, KS, false, false, false>(xp, NormIn<T>{}, RopeOut<T>{}, wp, y + (long long)pair * N, N, K, 0,
                                                gated);
}

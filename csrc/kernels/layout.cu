// get_dispatch_layout: per-rank and per-expert token counts and the token -> rank bitmap.
// Local work only (no peers). Integer counts, so the atomics leave the result deterministic.
#include "api.cuh"
#include "config.cuh"
#include "exception.cuh"
#include "ptx.cuh"

namespace deep_ep {
namespace layout {

// Experts counted in shared memory before one global atomic per (block, expert); beyond this the
// block counts straight into global memory.
constexpr int kMaxSmemExperts = 8192;

__global__ void __launch_bounds__(kNumLayoutThreads) get_dispatch_layout_kernel(LayoutArgs args) {
    int* s_expert_counts = ptx::dynamic_shared_memory<int>();  // [num_experts] when use_smem
    __shared__ int s_rank_counts[kMaxNvlRanks];
    const bool use_smem = args.num_experts <= kMaxSmemExperts;
    for (int e = threadIdx.x; use_smem && e < args.num_experts; e += blockDim.x) s_expert_counts[e] = 0;
    if (threadIdx.x < kMaxNvlRanks) s_rank_counts[threadIdx.x] = 0;
    __syncthreads();

    const int experts_per_rank = args.num_experts / args.num_ranks;
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t < args.num_tokens) {
        unsigned rank_mask = 0;
        for (int k = 0; k < args.num_topk; ++k) {
            const int64_t e = args.topk_idx[static_cast<int64_t>(t) * args.num_topk + k];
            if (e < 0 || e >= args.num_experts) continue;  // -1 = unused (the Python side checks the range)
            rank_mask |= 1u << (static_cast<int>(e) / experts_per_rank);
            atomicAdd(use_smem ? &s_expert_counts[e] : &args.num_tokens_per_expert[e], 1);
        }
        for (int r = 0; r < args.num_ranks; ++r) {
            const bool hit = (rank_mask >> r) & 1u;
            args.is_token_in_rank[static_cast<int64_t>(t) * args.num_ranks + r] = hit;
            if (hit) atomicAdd(&s_rank_counts[r], 1);
        }
    }
    __syncthreads();
    for (int e = threadIdx.x; use_smem && e < args.num_experts; e += blockDim.x) {
        if (s_expert_counts[e] != 0) atomicAdd(&args.num_tokens_per_expert[e], s_expert_counts[e]);
    }
    if (threadIdx.x < args.num_ranks && s_rank_counts[threadIdx.x] != 0)
        atomicAdd(&args.num_tokens_per_rank[threadIdx.x], s_rank_counts[threadIdx.x]);
}

void get_dispatch_layout(const LayoutArgs& args, cudaStream_t stream) {
    host_check(args.num_ranks >= 1 && args.num_ranks <= kMaxNvlRanks,
               "get_dispatch_layout: num_ranks must be in [1, " + std::to_string(kMaxNvlRanks) + "], got " +
                   std::to_string(args.num_ranks));
    host_check(args.num_experts > 0 && args.num_experts % args.num_ranks == 0,
               "get_dispatch_layout: num_experts must be a positive multiple of num_ranks, got " +
                   std::to_string(args.num_experts));
    // The counts accumulate: start from zero (graph-capturable, unlike a host-side fill).
    DEEP_EP_CUDA_CHECK(cudaMemsetAsync(args.num_tokens_per_rank, 0, sizeof(int) * args.num_ranks, stream));
    DEEP_EP_CUDA_CHECK(cudaMemsetAsync(args.num_tokens_per_expert, 0, sizeof(int) * args.num_experts, stream));
    if (args.num_tokens == 0) return;
    const int num_blocks = (args.num_tokens + kNumLayoutThreads - 1) / kNumLayoutThreads;
    const size_t smem = args.num_experts <= kMaxSmemExperts ? sizeof(int) * args.num_experts : 0;
    DEEP_EP_LAUNCH(get_dispatch_layout_kernel, num_blocks, kNumLayoutThreads, smem, stream, args);
    DEEP_EP_CHECK_LAUNCH(get_dispatch_layout_kernel);
}

}  // namespace layout
}  // namespace deep_ep

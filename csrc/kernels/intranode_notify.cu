// Intranode notify kernels: the count exchange before a dispatch, and the ring reset before a
// cached dispatch or a combine. Both run as one block and are latency-bound, not bandwidth-bound.
#include "api.cuh"
#include "buffer_layout.cuh"
#include "config.cuh"
#include "exception.cuh"
#include "peer.cuh"
#include "ptx.cuh"
#include "utils.cuh"

namespace deep_ep {
namespace intranode {

// Zeroes this rank's ring head and tail counters (it is the receiver of all of them). Called only
// between two barriers: after the first, no peer still reads or writes them for the previous
// operation; before the second, so no sender of the next kernel can publish a tail too early.
__device__ __forceinline__ void zero_own_ring_counters(const IntranodeLayout& buffer, void* own_base) {
    const int num_rings = static_cast<int>(buffer.num_rings());
    int* head = buffer.ring_head(own_base);
    int* tail = buffer.ring_tail(own_base);
    for (int i = threadIdx.x; i < num_rings; i += blockDim.x) {
        head[i] = 0;
        tail[i] = 0;
    }
}

// Sequence of the notify kernel (one block, kNumNotifyThreads threads):
//   1. count, per channel and destination, the tokens this rank sends (local);
//   2. barrier: every rank finished the previous operation on the buffers;
//   3. write this rank's row of counts into every peer's metadata, zero own ring counters;
//   4. barrier: all counts have arrived everywhere;
//   5. read the full count matrix: prefix matrices, received totals, per-expert counts, the
//      host-mapped counters (the host polls them) and the worst-token overflow flag.
__global__ void __launch_bounds__(kNumNotifyThreads, 1) notify_dispatch_kernel(NotifyDispatchArgs args) {
    const IntranodeLayout& buf = args.buffer;
    const int num_ranks = buf.num_ranks, num_channels = buf.num_channels, rank = args.rank;
    const int num_local_experts = buf.num_local_experts;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    constexpr int kNumWarps = kNumNotifyThreads / 32;

    // s_counts[d][c]: tokens of channel c this rank sends to d, then the inclusive prefix over c.
    __shared__ int s_counts[kMaxNvlRanks][kMaxChannels];
    __shared__ int s_max_recv;

    // ---- 1. per-channel counts, one warp per channel, one register counter per destination
    for (int c = warp; c < num_channels; c += kNumWarps) {
        const ChannelRange range = channel_range(args.num_tokens, num_channels, c);
        int count[kMaxNvlRanks];
#pragma unroll
        for (int d = 0; d < kMaxNvlRanks; ++d) count[d] = 0;
        for (int t = range.begin + lane; t < range.end; t += 32) {
            const bool* row = args.is_token_in_rank + static_cast<int64_t>(t) * num_ranks;
#pragma unroll
            for (int d = 0; d < kMaxNvlRanks; ++d)
                if (d < num_ranks) count[d] += row[d] ? 1 : 0;
        }
#pragma unroll
        for (int d = 0; d < kMaxNvlRanks; ++d) {
            int v = count[d];
#pragma unroll
            for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
            if (lane == 0 && d < num_ranks) s_counts[d][c] = v;
        }
    }
    if (threadIdx.x == 0) s_max_recv = 0;
    __syncthreads();
    if (threadIdx.x < num_ranks) {
        const int d = threadIdx.x;
        int running = 0;
        for (int c = 0; c < num_channels; ++c) {
            running += s_counts[d][c];
            s_counts[d][c] = running;
            args.channel_prefix_matrix[d * num_channels + c] = running;
        }
    }

    // ---- 2.
    barrier_all_ranks(args.peers, rank, num_ranks, args.timeout_ns, "notify_dispatch (barrier 1)");

    // ---- 3. my row into every peer d: tokens I send to each rank (all of them: every rank builds the
    // full rank_prefix_matrix; the last inclusive channel prefix is the total), counts of d's
    // experts, my channel prefix towards d.
    for (int i = threadIdx.x; i < num_ranks * num_ranks; i += blockDim.x) {
        const int d = i / num_ranks, j = i % num_ranks;
        ptx::st_relaxed_sys_global(buf.meta_rank_counts(args.peers.data[d], rank) + j, s_counts[j][num_channels - 1]);
    }
    for (int i = threadIdx.x; i < num_ranks * num_local_experts; i += blockDim.x) {
        const int d = i / num_local_experts, j = i % num_local_experts;
        ptx::st_relaxed_sys_global(buf.meta_expert(args.peers.data[d], rank) + j,
                                   args.num_tokens_per_expert[d * num_local_experts + j]);
    }
    for (int i = threadIdx.x; i < num_ranks * num_channels; i += blockDim.x) {
        const int d = i / num_channels, c = i % num_channels;
        ptx::st_relaxed_sys_global(buf.meta_channel(args.peers.data[d], rank) + c, s_counts[d][c]);
    }
    zero_own_ring_counters(buf, args.peers.data[rank]);

    // ---- 4. (its release/acquire publishes the metadata written in step 3)
    barrier_all_ranks(args.peers, rank, num_ranks, args.timeout_ns, "notify_dispatch (barrier 2)");

    // ---- 5.
    void* own = args.peers.data[rank];
    if (threadIdx.x < num_ranks) {
        const int j = threadIdx.x;  // destination column
        int running = 0;
        for (int i = 0; i < num_ranks; ++i) {
            running += ptx::ld_relaxed_sys_global(buf.meta_rank_counts(own, i) + j);
            args.rank_prefix_matrix[i * num_ranks + j] = running;
        }
        atomicMax(&s_max_recv, running);
    }
    for (int i = threadIdx.x; i < num_ranks * num_channels; i += blockDim.x) {
        const int s = i / num_channels, c = i % num_channels;
        args.recv_channel_prefix_matrix[i] = c == 0 ? 0 : ptx::ld_relaxed_sys_global(buf.meta_channel(own, s) + c - 1);
    }
    if (args.num_worst_tokens == 0) {
        for (int j = threadIdx.x; j < num_local_experts; j += blockDim.x) {
            int sum = 0;
            for (int s = 0; s < num_ranks; ++s) sum += ptx::ld_relaxed_sys_global(buf.meta_expert(own, s) + j);
            // Host-mapped memory: a volatile store goes straight over the bus, no caching.
            *reinterpret_cast<volatile int*>(args.host_counters + kCounterExperts + j) =
                aligned_count(sum, args.expert_alignment);
        }
        // Before thread 0 publishes the token count below (the host reads these once it is >= 0).
        __threadfence_system();
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        if (args.num_worst_tokens == 0) {
            int total = 0;
            for (int i = 0; i < num_ranks; ++i) total += ptx::ld_relaxed_sys_global(buf.meta_rank_counts(own, i) + rank);
            // The host reads the expert counters once this one is >= 0: make them visible first.
            __threadfence_system();
            *reinterpret_cast<volatile int*>(args.host_counters + kCounterRecvTokens) = total;
        } else if (s_max_recv > args.num_worst_tokens) {
            // Every rank sees the same matrix, so every rank flags the overflow; the receivers drop
            // the rows that do not fit and the host raises at this buffer's next call.
            *reinterpret_cast<volatile int*>(args.host_counters + kCounterWorstOverflow) = s_max_recv;
        }
    }
}

void notify_dispatch(const NotifyDispatchArgs& args, cudaStream_t stream) {
    const IntranodeLayout& buf = args.buffer;
    host_check(buf.num_ranks >= 1 && buf.num_ranks <= kMaxNvlRanks, "notify_dispatch: bad num_ranks");
    host_check(buf.num_channels >= 1 && buf.num_channels <= kMaxChannels,
               "notify_dispatch: num_channels must be in [1, " + std::to_string(kMaxChannels) + "], got " +
                   std::to_string(buf.num_channels));
    host_check(buf.num_local_experts <= kMaxLocalExperts,
               "notify_dispatch: at most " + std::to_string(kMaxLocalExperts) + " experts per rank, got " +
                   std::to_string(buf.num_local_experts));
    DEEP_EP_LAUNCH(notify_dispatch_kernel, 1, kNumNotifyThreads, 0, stream, args);
    DEEP_EP_CHECK_LAUNCH(notify_dispatch_kernel);
}

__global__ void __launch_bounds__(kNumNotifyThreads, 1) cached_notify_kernel(CachedNotifyArgs args) {
    barrier_all_ranks(args.peers, args.rank, args.buffer.num_ranks, args.timeout_ns, "cached_notify (barrier 1)");
    zero_own_ring_counters(args.buffer, args.peers.data[args.rank]);
    barrier_all_ranks(args.peers, args.rank, args.buffer.num_ranks, args.timeout_ns, "cached_notify (barrier 2)");
}

void cached_notify(const CachedNotifyArgs& args, cudaStream_t stream) {
    host_check(args.buffer.num_ranks >= 1 && args.buffer.num_ranks <= kMaxNvlRanks, "cached_notify: bad num_ranks");
    DEEP_EP_LAUNCH(cached_notify_kernel, 1, kNumNotifyThreads, 0, stream, args);
    DEEP_EP_CHECK_LAUNCH(cached_notify_kernel);
}

}  // namespace intranode
}  // namespace deep_ep

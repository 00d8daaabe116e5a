// Intranode combine: every rank sends the rows it received back to their source ranks, which sum
// them per token in fp32 (docs/semantics.md: bias_0, then bias_1, then the ranks in ascending order).
//
// Grid: 2 blocks per channel. Even block 2c: one team per destination (the original source) pushes
// the rows of (destination, c) into ring (c, rank) of the destination's buffer, in the order the
// destination's dispatch sender filled its own ring, so the slot of a row equals the destination's
// send_head entry. Odd block 2c+1: reduces channel c's tokens, one token per warp at a time, and
// releases ring slots in token order.
//
// Progress: the reducing block handles a batch of at most min(warps, Q) tokens; each needs at most
// one slot per ring, and every slot before the batch is already released, so the needed slots are
// within Q of the head and a sender can always push them (it sends whatever room allows).
#include "api.cuh"
#include "buffer_layout.cuh"
#include "config.cuh"
#include "exception.cuh"
#include "peer.cuh"
#include "ptx.cuh"
#include "utils.cuh"

namespace deep_ep {
namespace intranode {

namespace {

// Sender team for destination `dst` (the rank the rows came from) on `channel`.
__device__ void combine_sender(const CombineArgs& args, int channel, int dst, int warp_in_team, int num_warps,
                               int lane) {
    __shared__ volatile int s_chunk[kMaxNvlRanks];
    const IntranodeLayout& buf = args.buffer;
    const int capacity = buf.num_slots, num_topk = buf.num_topk;
    const int64_t row_int4 = buf.row_bytes / 16;
    const RecvSegment seg = recv_segment(args.rank_prefix_matrix, args.recv_channel_prefix_matrix, buf.num_ranks,
                                         buf.num_channels, args.rank, dst, channel);
    void* dst_base = args.peers.data[dst];
    int* remote_tail = buf.tail(dst_base, channel, args.rank);
    const int* remote_head = buf.head(dst_base, channel, args.rank);

    int sent = 0;
    while (sent < seg.count) {
        // Acquire on head pairs with the reducer's release: its reads of freed slots are done.
        if (warp_in_team == 0 && lane == 0) {
            SpinWait wait(args.timeout_ns);
            int head, free_slots;
            while ((free_slots = ring_free_slots(sent, head = ptx::ld_acquire_sys_global(remote_head), capacity)) < 1) {
                if (wait.expired())
                    report_timeout_and_trap("intranode combine", WaitRole::kCombineSender, args.rank, channel, dst,
                                            sent + 1 - capacity, head);
            }
            s_chunk[dst] = min(min(args.num_max_send_tokens, seg.count - sent), free_slots);
        }
        ptx::bar_sync(dst + 1, num_warps * 32);
        const int chunk = s_chunk[dst];
        for (int i = warp_in_team; i < chunk; i += num_warps) {
            const int slot = sent + i;
            const int64_t row = static_cast<int64_t>(seg.row_begin) + slot;
            // Two loads in flight per lane: four would push the kernel past its 80 registers.
            warp_copy_nc_to_global<2>(buf.x(dst_base, channel, args.rank, slot), args.x + row * row_int4, row_int4, lane);
            if (lane < num_topk)
                buf.topk_weights(dst_base, channel, args.rank, slot)[lane] = args.topk_weights[row * num_topk + lane];
        }
        // Slot writes of the whole team before the tail release (pairs with the reducer's acquire).
        ptx::bar_sync(dst + 1, num_warps * 32);
        sent += chunk;
        if (warp_in_team == 0 && lane == 0) ptx::st_release_sys_global(remote_tail, sent);
    }
}

// One warp reduces token `t`: waits for its rows, sums them in fp32, writes bf16.
__device__ __forceinline__ void reduce_token(const CombineArgs& args, void* own, int channel, int t, int lane,
                                             int* s_head) {
    const IntranodeLayout& buf = args.buffer;
    const int num_ranks = buf.num_ranks, num_topk = buf.num_topk;
    const int64_t row_int4 = buf.row_bytes / 16;

    // Lane d < R: the slot of this token in ring (channel, d), -1 if it was not sent to d.
    const int my_slot = lane < num_ranks ? args.send_head[static_cast<int64_t>(t) * num_ranks + lane] : -1;
    if (my_slot >= 0) {
        // Acquire on the tail pairs with the sender's release; __syncwarp passes it to the warp.
        SpinWait wait(args.timeout_ns);
        int tail;
        while ((tail = ptx::ld_acquire_sys_global(buf.tail(own, channel, lane))) <= my_slot) {
            if (wait.expired())
                report_timeout_and_trap("intranode combine", WaitRole::kCombineReceiver, args.rank, channel, lane,
                                        my_slot + 1, tail);
        }
    }
    __syncwarp();
    const unsigned sent_to = __ballot_sync(0xffffffffu, my_slot >= 0);
    // Row d of this token as an int4 index from the start of the x region (32 bits: the host checks
    // the region is below 32 GiB). Lane d computes it, every lane gets all of them: 8 registers,
    // instead of 8 64-bit pointers, keeps the kernel within its 80-register budget.
    const int4* ring_x = reinterpret_cast<const int4*>(static_cast<char*>(own) + buf.offset(IntranodeLayout::kX));
    const int my_row = my_slot >= 0 ? static_cast<int>(buf.slot_index(channel, lane, my_slot) * row_int4) : 0;
    int rows[kMaxNvlRanks];
#pragma unroll
    for (int d = 0; d < kMaxNvlRanks; ++d) rows[d] = __shfl_sync(0xffffffffu, my_row, d);

    for (int64_t i = lane; i < row_int4; i += 32) {
        float acc[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[j] = 0.0f;
        if (args.bias_0 != nullptr) add_bf16x8(acc, ptx::ld_nc_global_v4(args.bias_0 + t * row_int4 + i));
        if (args.bias_1 != nullptr) add_bf16x8(acc, ptx::ld_nc_global_v4(args.bias_1 + t * row_int4 + i));
#pragma unroll
        for (int d = 0; d < kMaxNvlRanks; ++d) {
            if ((sent_to >> d) & 1u) add_bf16x8(acc, ptx::ld_na_global_v4(ring_x + rows[d] + i));
        }
        args.combined_x[t * row_int4 + i] = pack_bf16x8(acc);
    }
    if (num_topk > 0) {
        float acc = 0.0f;
        for (int d = 0; d < num_ranks; ++d) {
            const int slot = __shfl_sync(0xffffffffu, my_slot, d);  // whole warp: lane d is the source
            if (lane < num_topk && slot >= 0)
                acc += __int_as_float(ptx::ld_na_global(
                    reinterpret_cast<const int*>(buf.topk_weights(own, channel, d, slot)) + lane));
        }
        if (lane < num_topk) args.combined_topk_weights[static_cast<int64_t>(t) * num_topk + lane] = acc;
    }
    if (my_slot >= 0) atomicMax(&s_head[lane], my_slot + 1);
}

// The reducing block of `channel`.
__device__ void combine_receiver(const CombineArgs& args, int channel) {
    __shared__ int s_head[kMaxNvlRanks];  // slots of each ring consumed after the current batch
    const IntranodeLayout& buf = args.buffer;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int num_active = min(kNumIntranodeWarps, buf.num_slots);
    const ChannelRange range = channel_range(args.num_tokens, buf.num_channels, channel);
    void* own = args.peers.data[args.rank];
    if (threadIdx.x < kMaxNvlRanks) s_head[threadIdx.x] = 0;
    int published = 0;  // thread d < R: the head last released for ring (channel, d)
    __syncthreads();

    for (int batch = range.begin; batch < range.end; batch += num_active) {
        const int t = batch + warp;
        if (warp < num_active && t < range.end) reduce_token(args, own, channel, t, lane, s_head);
        // The batch's reads are done before heads move: release, paired with the senders' acquire.
        __syncthreads();
        if (threadIdx.x < buf.num_ranks) {
            const int head = s_head[threadIdx.x];
            if (head != published) {
                ptx::st_release_sys_global(buf.head(own, channel, threadIdx.x), head);
                published = head;
            }
        }
        // s_head must not grow for the next batch before it was read above.
        __syncthreads();
    }
}

__global__ void __launch_bounds__(kNumIntranodeThreads, 1) combine_kernel(CombineArgs args) {
    const int channel = blockIdx.x / 2;
    if (blockIdx.x % 2 == 1) {
        combine_receiver(args, channel);
        return;
    }
    const int num_ranks = args.buffer.num_ranks;
    const int warp = threadIdx.x / 32, num_warps = kNumIntranodeWarps / num_ranks;
    const int dst = warp / num_warps;
    if (dst >= num_ranks) return;  // idle warps
    combine_sender(args, channel, dst, warp % num_warps, num_warps, threadIdx.x % 32);
}

}  // namespace

void combine(const CombineArgs& args, cudaStream_t stream) {
    const IntranodeLayout& buf = args.buffer;
    host_check(buf.num_ranks >= 1 && buf.num_ranks <= kMaxNvlRanks, "intranode combine: bad num_ranks");
    host_check(buf.num_topk <= kMaxTopK && buf.num_topk <= 32, "intranode combine: num_topk must be <= 32");
    host_check(buf.row_bytes % 16 == 0, "intranode combine: hidden * 2 must be a multiple of 16 bytes, got " +
                                            std::to_string(buf.row_bytes));
    host_check(args.num_max_send_tokens >= 1 && buf.num_slots >= 1, "intranode combine: empty chunk or ring");
    DEEP_EP_LAUNCH(combine_kernel, buf.num_channels * 2, kNumIntranodeThreads, 0, stream, args);
    DEEP_EP_CHECK_LAUNCH(combine_kernel);
}

int combine_max_blocks_per_sm() {
    int per_sm = 0;
    DEEP_EP_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, combine_kernel, kNumIntranodeThreads, 0));
    return per_sm;
}

}  // namespace intranode
}  // namespace deep_ep

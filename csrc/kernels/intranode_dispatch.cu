// Intranode dispatch: channels of ring buffers over peer memory.
//
// Grid: 2 blocks per channel. Even block 2c sends channel c's tokens, odd block 2c+1 receives what
// every source sends on channel c. Inside a block the warps form one team per peer rank
// (kNumIntranodeWarps / R warps each; leftover warps idle); a team synchronises with its own named
// barrier (id = peer + 1).
//
// Ring protocol, per (channel c, source s) ring in the receiver's buffer (see buffer_layout.cuh):
//   sender:   wait until the ring has room for a chunk (acquire-load head), write up to
//             num_max_send_tokens tokens into slots tail % Q .., team barrier, then publish the new
//             tail with a release store;
//   receiver: acquire-load tail, copy slots [head, tail) out, team barrier, then publish head with a
//             release store (the slots may be overwritten after that).
// The receiver knows how many tokens (s, c) brings from the prefix matrices, so no end marker.
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

struct Team {
    int peer;            // rank this team serves; >= num_ranks: idle warp
    int warp_in_team;
    int num_warps;       // warps per team
    int lane;
};

__device__ __forceinline__ Team make_team(int num_ranks) {
    Team team;
    const int warp = threadIdx.x / 32;
    team.num_warps = kNumIntranodeWarps / num_ranks;
    team.peer = warp / team.num_warps;
    team.warp_in_team = warp % team.num_warps;
    team.lane = threadIdx.x % 32;
    return team;
}

// One warp writes token `t` into slot `slot` of ring (channel, rank) in the destination's buffer.
__device__ __forceinline__ void send_token(const DispatchArgs& args, void* dst_base, int channel, int dst, int t,
                                           int slot, int lane) {
    const IntranodeLayout& buf = args.buffer;
    const int64_t row_int4 = buf.row_bytes / 16;
    warp_copy_nc_to_global(buf.x(dst_base, channel, args.rank, slot), args.x + t * row_int4, row_int4, lane);
    if (lane == 0) *buf.src_idx(dst_base, channel, args.rank, slot) = t;
    if (buf.with_topk_idx && lane < buf.num_topk) {
        // Expert ids travel already translated to the destination's local ids (-1 elsewhere).
        const int64_t e = args.topk_idx[static_cast<int64_t>(t) * buf.num_topk + lane];
        const int64_t local = e - static_cast<int64_t>(dst) * args.num_local_experts;
        const bool is_local = e >= 0 && local >= 0 && local < args.num_local_experts;
        buf.topk_idx(dst_base, channel, args.rank, slot)[lane] = is_local ? static_cast<int>(local) : -1;
        buf.topk_weights(dst_base, channel, args.rank, slot)[lane] =
            is_local ? args.topk_weights[static_cast<int64_t>(t) * buf.num_topk + lane] : 0.0f;
    }
    for (int i = lane; i < buf.num_scales; i += 32) {
        buf.scales(dst_base, channel, args.rank, slot)[i] =
            args.x_scales[t * args.scale_token_stride + i * args.scale_hidden_stride];
    }
}

// Sender team for destination `team.peer` on `channel`.
__device__ void dispatch_sender(const DispatchArgs& args, int channel, const Team& team) {
    const IntranodeLayout& buf = args.buffer;
    const int num_ranks = buf.num_ranks, dst = team.peer, lane = team.lane;
    const int capacity = buf.num_slots;
    const int chunk_tokens = min(args.num_max_send_tokens, capacity);
    const ChannelRange range = channel_range(args.num_tokens, buf.num_channels, channel);
    void* dst_base = args.peers.data[dst];
    int* remote_tail = buf.tail(dst_base, channel, args.rank);
    const int* remote_head = buf.head(dst_base, channel, args.rank);
    const unsigned lanes_below = (1u << lane) - 1;

    int sent = 0;  // tokens of this channel sent to dst so far == the tail this team publishes
    int t = range.begin;
    while (t < range.end) {
        // Room for a whole chunk. Acquire: pairs with the receiver's release of head, so its reads of
        // the freed slots are complete before this team overwrites them.
        if (lane == 0) {
            SpinWait wait(args.timeout_ns);
            int head;
            while (ring_free_slots(sent, head = ptx::ld_acquire_sys_global(remote_head), capacity) < chunk_tokens) {
                if (wait.expired())
                    report_timeout_and_trap("intranode dispatch", WaitRole::kDispatchSender, args.rank, channel, dst,
                                            sent + chunk_tokens - capacity, head);
            }
        }
        __syncwarp();

        // Gather up to chunk_tokens tokens for dst, 32 candidates per step; the k-th of them is
        // copied by warp k % num_warps of the team.
        int chunk = 0;
        while (chunk < chunk_tokens && t < range.end) {
            const int candidates = min(32, range.end - t);
            const bool wanted = lane < candidates &&
                                args.is_token_in_rank[static_cast<int64_t>(t + lane) * num_ranks + dst];
            const unsigned mask = __ballot_sync(0xffffffffu, wanted);
            const int order = __popc(mask & lanes_below);  // index among this step's wanted tokens
            // Stop after the token that fills the chunk; the rest of the step is seen again next time.
            const unsigned last = __ballot_sync(0xffffffffu, wanted && chunk + order == chunk_tokens - 1);
            const int consumed = last != 0 ? __ffs(last) : candidates;
            if (args.send_head != nullptr && team.warp_in_team == 0 && lane < consumed)
                args.send_head[static_cast<int64_t>(t + lane) * num_ranks + dst] = wanted ? sent + chunk + order : -1;
            unsigned todo = consumed == 32 ? mask : mask & ((1u << consumed) - 1);
            while (todo != 0) {
                const int b = __ffs(todo) - 1;
                todo &= todo - 1;
                if (chunk % team.num_warps == team.warp_in_team) send_token(args, dst_base, channel, dst, t + b, sent + chunk, lane);
                ++chunk;
            }
            t += consumed;
        }

        // Every warp's slot writes happen-before the tail release (bar.sync, then a cumulative
        // release). Pairs with the receiver's acquire of the tail.
        ptx::bar_sync(dst + 1, team.num_warps * 32);
        sent += chunk;
        if (team.warp_in_team == 0 && lane == 0) ptx::st_release_sys_global(remote_tail, sent);
    }
}

// One warp copies slot `slot` of ring (channel, src) into output row `row`.
__device__ __forceinline__ void receive_token(const DispatchArgs& args, void* own, int channel, int src, int slot,
                                              int64_t row, int lane) {
    const IntranodeLayout& buf = args.buffer;
    const int64_t row_int4 = buf.row_bytes / 16;
    warp_copy_ring_to_global(args.recv_x + row * row_int4, buf.x(own, channel, src, slot), row_int4, lane);
    if (args.recv_src_idx != nullptr && lane == 0)
        args.recv_src_idx[row] = ptx::ld_na_global(buf.src_idx(own, channel, src, slot));
    if (buf.with_topk_idx && lane < buf.num_topk) {
        args.recv_topk_idx[row * buf.num_topk + lane] = ptx::ld_na_global(buf.topk_idx(own, channel, src, slot) + lane);
        args.recv_topk_weights[row * buf.num_topk + lane] = __int_as_float(
            ptx::ld_na_global(reinterpret_cast<const int*>(buf.topk_weights(own, channel, src, slot)) + lane));
    }
    for (int i = lane; i < buf.num_scales; i += 32)
        args.recv_x_scales[row * buf.num_scales + i] = ptx::ld_na_global(buf.scales(own, channel, src, slot) + i);
}

// Receiver team for source `team.peer` on `channel`.
__device__ void dispatch_receiver(const DispatchArgs& args, int channel, const Team& team) {
    __shared__ volatile int s_tail[kMaxNvlRanks];
    const IntranodeLayout& buf = args.buffer;
    const int src = team.peer, lane = team.lane;
    const RecvSegment seg = recv_segment(args.rank_prefix_matrix, args.recv_channel_prefix_matrix, buf.num_ranks,
                                         buf.num_channels, args.rank, src, channel);
    void* own = args.peers.data[args.rank];
    const int* tail_ptr = buf.tail(own, channel, src);
    int* head_ptr = buf.head(own, channel, src);

    int consumed = 0;
    while (consumed < seg.count) {
        // Acquire: pairs with the sender's release of the tail; the team barrier passes it on.
        if (team.warp_in_team == 0 && lane == 0) {
            SpinWait wait(args.timeout_ns);
            int tail;
            while ((tail = ptx::ld_acquire_sys_global(tail_ptr)) <= consumed) {
                if (wait.expired())
                    report_timeout_and_trap("intranode dispatch", WaitRole::kDispatchReceiver, args.rank, channel, src,
                                            consumed + 1, tail);
            }
            s_tail[src] = tail;
        }
        ptx::bar_sync(src + 1, team.num_warps * 32);
        const int tail = s_tail[src];
        for (int i = consumed + team.warp_in_team; i < tail; i += team.num_warps) {
            const int64_t row = static_cast<int64_t>(seg.row_begin) + i;
            // Rows past the output (num_worst_tokens overflow, already flagged by notify) are dropped.
            if (row < args.num_recv_rows) receive_token(args, own, channel, src, i, row, lane);
        }
        // All reads of slots [consumed, tail) are done before head moves: release, paired with the
        // sender's acquire of head.
        ptx::bar_sync(src + 1, team.num_warps * 32);
        if (team.warp_in_team == 0 && lane == 0) ptx::st_release_sys_global(head_ptr, tail);
        consumed = tail;
    }
}

__global__ void __launch_bounds__(kNumIntranodeThreads, 1) dispatch_kernel(DispatchArgs args) {
    const Team team = make_team(args.buffer.num_ranks);
    if (team.peer >= args.buffer.num_ranks) return;  // idle warps (R does not divide the warp count)
    const int channel = blockIdx.x / 2;
    if (blockIdx.x % 2 == 0)
        dispatch_sender(args, channel, team);
    else
        dispatch_receiver(args, channel, team);
}

// Rows [received, num_recv_rows) of a num_worst_tokens (or cached, padded) dispatch: zero data and
// scales, -1 indices, zero weights. The received count is read on the device (no host sync).
__global__ void fill_trailing_rows_kernel(DispatchArgs args) {
    const IntranodeLayout& buf = args.buffer;
    const int received = args.rank_prefix_matrix[(buf.num_ranks - 1) * buf.num_ranks + args.rank];
    const int64_t begin = min(received, args.num_recv_rows);
    const int64_t row_int4 = buf.row_bytes / 16;
    const int lane = threadIdx.x % 32;
    const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
    for (int64_t row = begin + blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; row < args.num_recv_rows;
         row += warps) {
        for (int64_t i = lane; i < row_int4; i += 32) args.recv_x[row * row_int4 + i] = make_int4(0, 0, 0, 0);
        for (int i = lane; i < buf.num_scales; i += 32) args.recv_x_scales[row * buf.num_scales + i] = 0;
        if (buf.with_topk_idx && lane < buf.num_topk) {
            args.recv_topk_idx[row * buf.num_topk + lane] = -1;
            args.recv_topk_weights[row * buf.num_topk + lane] = 0.0f;
        }
        if (args.recv_src_idx != nullptr && lane == 0) args.recv_src_idx[row] = -1;
    }
}

}  // namespace

void dispatch(const DispatchArgs& args, cudaStream_t stream) {
    const IntranodeLayout& buf = args.buffer;
    host_check(buf.num_ranks >= 1 && buf.num_ranks <= kMaxNvlRanks, "intranode dispatch: bad num_ranks");
    host_check(buf.num_topk <= kMaxTopK && buf.num_topk <= 32, "intranode dispatch: num_topk must be <= 32");
    host_check(buf.row_bytes % 16 == 0, "intranode dispatch: hidden bytes must be a multiple of 16, got " +
                                            std::to_string(buf.row_bytes));
    host_check(args.num_max_send_tokens >= 1 && buf.num_slots >= 1, "intranode dispatch: empty chunk or ring");
    DEEP_EP_LAUNCH(dispatch_kernel, buf.num_channels * 2, kNumIntranodeThreads, 0, stream, args);
    DEEP_EP_CHECK_LAUNCH(dispatch_kernel);
    if (args.fill_trailing_rows && args.num_recv_rows > 0) {
        constexpr int kFillThreads = 256;
        const int blocks = min(132, (args.num_recv_rows + kFillThreads / 32 - 1) / (kFillThreads / 32));
        DEEP_EP_LAUNCH(fill_trailing_rows_kernel, blocks, kFillThreads, 0, stream, args);
        DEEP_EP_CHECK_LAUNCH(fill_trailing_rows_kernel);
    }
}

int dispatch_max_blocks_per_sm() {
    int per_sm = 0;
    DEEP_EP_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, dispatch_kernel, kNumIntranodeThreads, 0));
    return per_sm;
}

}  // namespace intranode
}  // namespace deep_ep

// Internode (two-hop) normal-mode kernels, written once against the transport interface
// (transport.cuh) for the RDMA hop; the NVLink hop uses plain loads/stores into the node's NVL
// region. Instantiated with PeerTransport in libdeep_ep_core.so (internode.cu: "virtual nodes" whose
// ranks all map each other's memory) and with NvshmemTransport in libdeep_ep_nvshmem.so.
//
// Call, routing and handle: deep_ep_internode.h and docs/semantics.md. Buffers: internode_layout.cuh.
//
// Kernels of one operation (all on the caller's stream):
//   notify     1 block: count tokens per (rank, channel) and (node, channel); barrier; zero own ring
//              counters; every rank puts its counts for d into d's meta_in with a signal that is its
//              arrival at the second barrier; build the handle
//              (prefix matrices), the host-mapped counters and the worst-token overflow flag.
//   reset      1 block (before a cached dispatch and a combine): barrier; zero own counters; barrier.
//   dispatch   3 blocks per channel c:
//                sender     one warp team per destination node b: the channel's tokens that need b go,
//                           in token order, into ring (c, my node) at rank (b, my local): message =
//                           row + src_idx + bitmask of the ranks (b, j) that need it + top-k + scales.
//                           send_rdma_head[t, b] = the slot.
//                forwarder  for source node a = 0..NN-1 in turn, the ring (c, a): windows of up to 32
//                           messages; each goes to ring (c, my local) at every local rank j in its
//                           bitmask, slots in arrival order (send_nvl_head); lazy RDMA head updates.
//                receiver   one warp team per forwarder i: ring (c, i) brings the tokens of sources
//                           (a, i), a ascending, each in token order; the rows are known from
//                           recv_gbl_channel_prefix_matrix, so the output order is deterministic.
//   combine    3 blocks per channel c, the reverse:
//                nvl sender one team per forwarder i: the rows received from sources (a, i), in the
//                           order the dispatch delivered them, into ring (c, my local) at i.
//                forwarder  for a = 0..NN-1: one warp per token of stream (a, c): wait for its rows
//                           (send_nvl_head), sum them in fp32 over j ascending, round to bf16, send
//                           the partial into ring (c, my node) at (a, i), slot = the token's place.
//                reducer    one warp per token: bias_0 + bias_1 + the partials of its nodes in
//                           ascending order, in fp32; one bf16 rounding.
//
// Flow control: every ring is (head, tail) counters since the start of the operation, both in the
// memory of the rank that polls them (tail at the receiver, head at the sender); a sender waits for
// room, writes, then publishes the tail with a release; a receiver waits for the tail (acquire),
// reads, then releases the head. Every wait is bounded (SpinWait) and names rank, channel, peer.
//
// The RDMA hop (transport.cuh, 64-bit signal words; cost model: docs/internode-cost.md): a chunk of
// messages (dispatch: up to num_max_rdma_send; combine: one window) is ONE put-with-signal that SETs
// the tail word of the chunk's first slot to the chunk's end, so the receiver follows the chain of
// chunks and no quiet or fence is needed for data and tail to arrive in order; never wrapping around
// the ring. Heads are ADDed (repeated signals to one word may land out of order), one per chunk
// consumed (dispatch) or per batch (combine). Flags the network writes are read through the
// transport's test (NVSHMEM's test API). The only quiet is the one before a barrier's signals.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "../deep_ep_internode.h"
#include "buffer_layout.cuh"
#include "config.cuh"
#include "exception.cuh"
#include "internode_layout.cuh"
#include "ptx.cuh"
#include "transport.cuh"
#include "utils.cuh"

namespace deep_ep {
namespace internode {

template <typename Tr>
struct Args {
    deep_ep_internode_call c;
    InternodeLayout l;
    Tr tr;
};

// ------------------------------------------------------------------------------------------ helpers

// Whole warps call it; ptx::bar_sync converges the warp first (a lane may come from a spin-wait).
__device__ __forceinline__ void team_sync(int id, int num_warps) {
    if (num_warps == 1)
        __syncwarp();
    else
        ptx::bar_sync(id, num_warps * 32);
}

template <typename Tr>
__device__ __forceinline__ int my_node(const Args<Tr>& a) { return a.c.rank / a.c.num_ranks_per_node; }
template <typename Tr>
__device__ __forceinline__ int my_local(const Args<Tr>& a) { return a.c.rank % a.c.num_ranks_per_node; }
template <typename Tr>
__device__ __forceinline__ char* nvl(const Args<Tr>& a, int local, int64_t offset) {
    return static_cast<char*>(a.c.nvl_peers[local]) + offset;
}
template <typename Tr>
__device__ __forceinline__ int* rdma_int(const Args<Tr>& a, int64_t offset) {
    return reinterpret_cast<int*>(a.tr.local(offset));
}

// The NVL ring between forwarder (local rank i) and this rank on one channel carries the rows of the
// sources (a, i), a ascending, each in token order. RingRows maps a ring index to (source node, row
// of recv_x); one warp walks it with increasing indices.
struct RingRows {
    const int* recv_gbl_channel_prefix_matrix;
    const int* recv_gbl_rank_prefix_sum;
    int num_channels, channel, forwarder, num_ranks_per_node;
    int node, begin;  // ring index `begin` starts the rows of source node `node`
    RecvSegment seg;

    __device__ __forceinline__ RingRows(const deep_ep_internode_call& c, int channel_, int forwarder_)
        : recv_gbl_channel_prefix_matrix(c.recv_gbl_channel_prefix_matrix),
          recv_gbl_rank_prefix_sum(c.recv_gbl_rank_prefix_sum), num_channels(c.num_channels), channel(channel_),
          forwarder(forwarder_), num_ranks_per_node(c.num_ranks_per_node), node(0), begin(0) {
        seg = segment(0);
    }
    __device__ __forceinline__ RecvSegment segment(int n) const {
        return internode_recv_segment(recv_gbl_channel_prefix_matrix, recv_gbl_rank_prefix_sum, num_channels,
                                      n * num_ranks_per_node + forwarder, channel);
    }
    // Rows the ring carries in all (the sum over the source nodes).
    __device__ __forceinline__ int total(int num_nodes) const {
        int sum = 0;
        for (int n = 0; n < num_nodes; ++n) sum += segment(n).count;
        return sum;
    }
    // Row of ring index `idx` (>= every index asked before, < total); sets `node`.
    __device__ __forceinline__ int64_t row(int idx) {
        while (idx >= begin + seg.count) {
            begin += seg.count;
            seg = segment(++node);
        }
        return static_cast<int64_t>(seg.row_begin) + (idx - begin);
    }
};

// Bounded wait until this rank's 64-bit word at `offset` (a peer writes it with the transport's signals)
// is >= target, through the transport's test; returns the value seen.
template <typename Tr>
__device__ __forceinline__ uint64_t wait_signal_at_least(const Tr& tr, int64_t offset, uint64_t target,
                                                         uint64_t timeout_ns, const char* kernel, WaitRole role,
                                                         int rank, int channel, int peer) {
    SpinWait wait(timeout_ns);
    while (!tr.test_ge(offset, target)) {
        if (wait.expired())
            report_timeout_and_trap(kernel, role, rank, channel, peer, static_cast<int>(target),
                                    static_cast<int>(tr.read(offset)));
    }
    return tr.read(offset);
}

// The end of the RDMA chunk that starts at ring index `start` of this rank's ring (channel, node):
// waits for the chunk's tail word (internode_layout.cuh; values <= start are from earlier laps).
template <typename Tr>
__device__ __forceinline__ int wait_chunk_end(const Args<Tr>& a, int channel, int node, int start, const char* kernel,
                                              WaitRole role, int peer) {
    return static_cast<int>(wait_signal_at_least(a.tr, a.l.rdma_tail(channel, node, start), static_cast<uint64_t>(start) + 1,
                                                 a.c.timeout_ns, kernel, role, a.c.rank, channel, peer));
}

// Bounded wait until *ptr (this rank's memory, written with load/store by NVL peers) >= target;
// returns the value seen.
__device__ __forceinline__ int wait_at_least(const int* ptr, int target, uint64_t timeout_ns, const char* kernel,
                                             WaitRole role, int rank, int channel, int peer) {
    SpinWait wait(timeout_ns);
    int value;
    while ((value = ptx::ld_acquire_sys_global(ptr)) < target) {
        if (wait.expired()) report_timeout_and_trap(kernel, role, rank, channel, peer, target, value);
    }
    return value;
}

// Barrier of all ranks over the transport, called by every thread of one block, in two halves. Each
// rank ADDs 1 to its word in every peer's sync area (the words count barriers and are never cleared),
// then waits until every peer's word in its own area reached this rank's own barrier count (kept in
// its buffer). A peer can be at most one barrier ahead, which `>=` tolerates.
//
// barrier_next_epoch: every thread's earlier stores are visible system-wide; with `quiet_first`,
// every network operation this rank issued before (earlier kernels' last head updates included) is
// complete before the barrier's first signal: a peer zeroes its ring counters once it passed the
// barrier, and a late update would land on them. Returns this barrier's count.
template <typename Tr>
__device__ uint64_t barrier_next_epoch(const Args<Tr>& a, bool quiet_first) {
    __shared__ uint64_t s_epoch;
    __threadfence_system();
    __syncthreads();
    if (threadIdx.x == 0) {
        if (quiet_first) a.tr.quiet();
        uint64_t* counter = reinterpret_cast<uint64_t*>(a.tr.local(a.l.epoch_word()));
        s_epoch = *counter + 1;
        *counter = s_epoch;
    }
    __syncthreads();
    return s_epoch;
}

template <typename Tr>
__device__ void barrier_wait(const Args<Tr>& a, uint64_t epoch, const char* kernel) {
    for (int pe = threadIdx.x; pe < a.c.num_ranks; pe += blockDim.x)
        wait_signal_at_least(a.tr, a.l.sync_word(pe), epoch, a.c.timeout_ns, kernel, WaitRole::kBarrier, a.c.rank, -1, pe);
    __syncthreads();
}

template <typename Tr>
__device__ void barrier_all(const Args<Tr>& a, bool quiet_first, const char* kernel) {
    const uint64_t epoch = barrier_next_epoch(a, quiet_first);
    for (int pe = threadIdx.x; pe < a.c.num_ranks; pe += blockDim.x)
        a.tr.signal(pe, a.l.sync_word(a.c.rank), 1, transport::SignalOp::kAdd);
    barrier_wait(a, epoch, kernel);
}

// Zero this rank's ring counters (it polls all of them). Only between two barriers: after the first
// nobody touches them for the previous operation, before the second nobody starts the next one.
template <typename Tr>
__device__ void zero_own_counters(const Args<Tr>& a) {
    const InternodeLayout& l = a.l;
    const int num_rdma = l.num_channels * l.num_nodes, num_nvl = l.num_channels * l.num_ranks_per_node;
    const int num_tail_words = num_rdma * l.num_rdma_slots;
    uint64_t* rdma_head = reinterpret_cast<uint64_t*>(a.tr.local(l.rdma_head(0, 0)));
    uint64_t* rdma_tail = reinterpret_cast<uint64_t*>(a.tr.local(l.rdma_tail(0, 0, 0)));
    int* nvl_head = reinterpret_cast<int*>(nvl(a, my_local(a), l.nvl_head(0, 0)));
    int* nvl_tail = reinterpret_cast<int*>(nvl(a, my_local(a), l.nvl_tail(0, 0)));
    for (int i = threadIdx.x; i < num_rdma; i += blockDim.x) rdma_head[i] = 0;
    for (int i = threadIdx.x; i < num_tail_words; i += blockDim.x) rdma_tail[i] = 0;
    for (int i = threadIdx.x; i < num_nvl; i += blockDim.x) nvl_head[i] = nvl_tail[i] = 0;
}

// ------------------------------------------------------------------------------------------- notify

template <typename Tr>
__global__ void __launch_bounds__(kNumNotifyThreads, 1) notify_kernel(Args<Tr> a) {
    const deep_ep_internode_call& c = a.c;
    const InternodeLayout& l = a.l;
    const int R = c.num_ranks, P = c.num_ranks_per_node, NN = l.num_nodes, C = c.num_channels;
    const int rank = c.rank, E_loc = l.num_local_experts, W = l.meta_words();
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    constexpr int kWarps = kNumNotifyThreads / 32;
    __shared__ int s_max_recv;

    // ---- 1. per-channel counts, then inclusive prefixes over the channels (both in the outputs)
    int* gbl = c.gbl_channel_prefix_matrix;   // [R, C]
    int* node_ch = c.rdma_channel_prefix_matrix;  // [NN, C]
    for (int i = tid; i < (R + NN) * C; i += blockDim.x) {
        const int row = i / C, ch = i % C;
        const ChannelRange range = channel_range(c.num_tokens, C, ch);
        int count = 0;
        if (row < R) {
            for (int t = range.begin; t < range.end; ++t) count += c.is_token_in_rank[static_cast<int64_t>(t) * R + row] ? 1 : 0;
            gbl[row * C + ch] = count;
        } else {
            const int b = row - R;
            for (int t = range.begin; t < range.end; ++t) {
                const uint8_t* flags = c.is_token_in_rank + static_cast<int64_t>(t) * R + b * P;
                bool any = false;
                for (int j = 0; j < P; ++j) any = any || flags[j] != 0;
                count += any ? 1 : 0;
            }
            node_ch[b * C + ch] = count;
        }
    }
    if (tid == 0) s_max_recv = 0;
    __syncthreads();
    for (int row = tid; row < R + NN; row += blockDim.x) {
        int* p = row < R ? gbl + row * C : node_ch + (row - R) * C;
        int running = 0;
        for (int ch = 0; ch < C; ++ch) p[ch] = running += p[ch];
    }

    // ---- 2. barrier 1: every rank finished its previous operation. Nothing is written into the RDMA
    // region before it: the previous operation's layout may differ (other E_loc / channels), and a
    // peer's last, late head update of that operation may land anywhere in its counter area until the
    // peer arrives here.
    barrier_all(a, true, "internode notify (barrier 1)");

    // ---- 3. meta_out[d]: gbl counts towards d, counts needing d's node, my totals per rank, my counts
    // for d's experts; zero own counters; then every row into its destination's meta_in with a
    // put-with-signal that is also this rank's arrival at barrier 2 (data before signal: no quiet)
    auto count_of = [&](const int* prefix_row, int ch) { return prefix_row[ch] - (ch > 0 ? prefix_row[ch - 1] : 0); };
    for (int i = tid; i < R * W; i += blockDim.x) {
        const int d = i / W, w = i % W;
        int v = 0;
        if (w < l.meta_rdma()) {
            v = count_of(gbl + d * C, w);
        } else if (w < l.meta_per_rank()) {
            v = count_of(node_ch + (d / P) * C, w - l.meta_rdma());
        } else if (w < l.meta_expert()) {
            v = gbl[(w - l.meta_per_rank()) * C + C - 1];
        } else if (w < l.meta_expert() + E_loc) {
            v = c.num_tokens_per_expert[d * E_loc + (w - l.meta_expert())];
        }
        rdma_int(a, l.meta_out(d))[w] = v;
    }
    zero_own_counters(a);
    const uint64_t epoch = barrier_next_epoch(a, false);
    for (int d = warp; d < R; d += kWarps)
        a.tr.put_signal_warp(d, l.meta_in(rank), a.tr.local(l.meta_out(d)), static_cast<int64_t>(W) * 4,
                             l.sync_word(rank), 1, transport::SignalOp::kAdd, lane);
    barrier_wait(a, epoch, "internode notify (barrier 2)");

    // ---- 4. the handle
    auto meta = [&](int src, int word) { return ptx::ld_relaxed_sys_global(rdma_int(a, l.meta_in(src)) + word); };
    const int local = rank % P;
    for (int an = tid; an < NN; an += blockDim.x) {
        const int src = an * P + local;
        int running = 0;
        for (int ch = 0; ch < C; ++ch) {
            running += meta(src, l.meta_rdma() + ch);
            c.recv_rdma_channel_prefix_matrix[an * C + ch] = running;
        }
        c.recv_rdma_rank_prefix_sum[an] = running;  // made inclusive over nodes below
    }
    for (int s = tid; s < R; s += blockDim.x) {
        int total = 0;
        for (int ch = 0; ch < C; ++ch) total += meta(s, l.meta_gbl() + ch);
        c.recv_gbl_rank_prefix_sum[s] = total;  // made inclusive over sources below
    }
    for (int d = tid; d < R; d += blockDim.x) {
        int total = 0;
        for (int s = 0; s < R; ++s) total += meta(s, l.meta_per_rank() + d);
        atomicMax(&s_max_recv, total);
    }
    __syncthreads();
    if (tid == 0) {
        for (int an = 1; an < NN; ++an) c.recv_rdma_rank_prefix_sum[an] += c.recv_rdma_rank_prefix_sum[an - 1];
        for (int s = 1; s < R; ++s) c.recv_gbl_rank_prefix_sum[s] += c.recv_gbl_rank_prefix_sum[s - 1];
    }
    __syncthreads();
    for (int s = tid; s < R; s += blockDim.x) {
        int running = s > 0 ? c.recv_gbl_rank_prefix_sum[s - 1] : 0;
        for (int ch = 0; ch < C; ++ch) {
            c.recv_gbl_channel_prefix_matrix[s * C + ch] = running;
            running += meta(s, l.meta_gbl() + ch);
        }
    }
    if (c.num_worst_tokens == 0) {
        for (int j = tid; j < E_loc; j += blockDim.x) {
            int sum = 0;
            for (int s = 0; s < R; ++s) sum += meta(s, l.meta_expert() + j);
            *reinterpret_cast<volatile int*>(c.host_counters + kCounterExperts + j) = aligned_count(sum, c.expert_alignment);
        }
    }
    __syncthreads();
    if (tid == 0) {
        if (c.num_worst_tokens == 0) {
            *reinterpret_cast<volatile int*>(c.host_counters + kCounterRdmaRecvTokens) = c.recv_rdma_rank_prefix_sum[NN - 1];
            // The host reads the other counters once the token count is >= 0: make them visible first.
            __threadfence_system();
            *reinterpret_cast<volatile int*>(c.host_counters + kCounterRecvTokens) = c.recv_gbl_rank_prefix_sum[R - 1];
        } else if (s_max_recv > c.num_worst_tokens) {
            // Every rank sees every rank's total, so every rank flags it; rows that do not fit are
            // dropped by the receivers and the host raises at this buffer's next call.
            *reinterpret_cast<volatile int*>(c.host_counters + kCounterWorstOverflow) = s_max_recv;
        }
    }
}

template <typename Tr>
__global__ void __launch_bounds__(kNumNotifyThreads, 1) reset_kernel(Args<Tr> a) {
    barrier_all(a, true, "internode ring reset (barrier 1)");
    zero_own_counters(a);
    barrier_all(a, false, "internode ring reset (barrier 2)");
}

// ----------------------------------------------------------------------------------------- dispatch

// One warp writes token t's message at `msg`.
template <typename Tr>
__device__ __forceinline__ void compose_dispatch(const Args<Tr>& a, char* msg, int t, int bits, int lane) {
    const deep_ep_internode_call& c = a.c;
    const InternodeLayout& l = a.l;
    const int64_t row_int4 = l.row_bytes / 16;
    warp_copy_nc_to_global<2>(reinterpret_cast<int4*>(msg), static_cast<const int4*>(c.x) + t * row_int4, row_int4,
                              lane);
    int* meta = reinterpret_cast<int*>(msg + l.msg_src_idx());
    if (lane == 0) {
        meta[0] = t;
        meta[1] = bits;
    }
    if (lane < l.num_topk) {
        const int64_t k = static_cast<int64_t>(t) * l.num_topk + lane;
        reinterpret_cast<int*>(msg + l.msg_topk_idx())[lane] = static_cast<int>(c.topk_idx[k]);
        reinterpret_cast<float*>(msg + l.msg_weights())[lane] = c.topk_weights[k];
    }
    const int* scales = static_cast<const int*>(c.x_scales);
    for (int i = lane; i < l.num_scales; i += 32)
        reinterpret_cast<int*>(msg + l.msg_scales())[i] = scales[t * c.scale_token_stride + i * c.scale_hidden_stride];
}

// Block role 0: one team per destination node.
template <typename Tr>
__device__ void dispatch_sender(const Args<Tr>& a, int channel) {
    const deep_ep_internode_call& c = a.c;
    const InternodeLayout& l = a.l;
    const int R = c.num_ranks, P = c.num_ranks_per_node, NN = l.num_nodes;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int team_warps = kNumInternodeWarps / NN;
    const int node = warp / team_warps, wit = warp % team_warps;
    if (node >= NN) return;  // idle warps
    const int pe = node * P + my_local(a);
    const int capacity = l.num_rdma_slots, max_chunk = min(c.num_max_rdma_send, capacity);
    const ChannelRange range = channel_range(c.num_tokens, l.num_channels, channel);
    const int64_t head = l.rdma_head(channel, node);
    // Load/store reachable (NVLink, this rank): messages are composed in place; else staged and sent.
    const bool direct = a.tr.peer_ptr(pe, 0) != nullptr;
    const unsigned below = (1u << lane) - 1;

    int sent = 0, t = range.begin;
    while (t < range.end) {
        // A chunk never wraps around the ring: it is one contiguous put.
        const int chunk_tokens = min(max_chunk, capacity - sent % capacity);
        if (lane == 0 && sent + chunk_tokens > capacity)
            wait_signal_at_least(a.tr, head, static_cast<uint64_t>(sent + chunk_tokens - capacity), c.timeout_ns,
                                 "internode dispatch", WaitRole::kDispatchSender, c.rank, channel, pe);
        __syncwarp();
        int chunk = 0;
        while (chunk < chunk_tokens && t < range.end) {
            const int candidates = min(32, range.end - t);
            int bits = 0;
            if (lane < candidates) {
                const uint8_t* flags = c.is_token_in_rank + static_cast<int64_t>(t + lane) * R + node * P;
                for (int j = 0; j < P; ++j) bits |= (flags[j] != 0 ? 1 : 0) << j;
            }
            const bool wanted = bits != 0;
            const unsigned mask = __ballot_sync(0xffffffffu, wanted);
            const int order = __popc(mask & below);
            const unsigned last = __ballot_sync(0xffffffffu, wanted && chunk + order == chunk_tokens - 1);
            const int consumed = last != 0 ? __ffs(last) : candidates;
            if (c.send_rdma_head != nullptr && wit == 0 && lane < consumed)
                c.send_rdma_head[static_cast<int64_t>(t + lane) * NN + node] = wanted ? sent + chunk + order : -1;
            unsigned todo = consumed == 32 ? mask : mask & ((1u << consumed) - 1);
            while (todo != 0) {
                const int b = __ffs(todo) - 1;
                todo &= todo - 1;
                const int token_bits = __shfl_sync(0xffffffffu, bits, b);
                if (chunk % team_warps == wit) {
                    const int slot = sent + chunk;
                    char* msg = direct ? a.tr.peer_ptr(pe, l.rdma_recv(channel, my_node(a), slot))
                                       : a.tr.local(l.rdma_send(channel, node, slot));
                    compose_dispatch(a, msg, t + b, token_bits, lane);
                }
                ++chunk;
            }
            t += consumed;
        }
        // Every warp's messages are written before the chunk goes out with its tail: one
        // put-with-signal (the staging slots are rewritten only after the forwarder's head says it
        // read them, which it does after the signal, i.e. after the data), or the tail alone.
        team_sync(node + 1, team_warps);
        if (wit == 0 && chunk > 0) {
            const int64_t tail = l.rdma_tail(channel, my_node(a), sent);
            const uint64_t end = static_cast<uint64_t>(sent + chunk);
            if (direct) {
                if (lane == 0) a.tr.signal(pe, tail, end, transport::SignalOp::kSet);
            } else {
                a.tr.put_signal_warp(pe, l.rdma_recv(channel, my_node(a), sent), a.tr.local(l.rdma_send(channel, node, sent)),
                                     chunk * l.msg_bytes, tail, end, transport::SignalOp::kSet, lane);
            }
        }
        sent += chunk;
    }
}

// Block role 1: the RDMA -> NVL forwarder of this rank for `channel`.
template <typename Tr>
__device__ void dispatch_forwarder(const Args<Tr>& a, int channel) {
    constexpr int kWindow = 32;
    __shared__ int s_slot[kWindow][kMaxInternodeLocalRanks];
    __shared__ int s_nvl_sent[kMaxInternodeLocalRanks];
    __shared__ int s_count;
    const deep_ep_internode_call& c = a.c;
    const InternodeLayout& l = a.l;
    const int P = c.num_ranks_per_node, NN = l.num_nodes, me_local = my_local(a), me_node = my_node(a);
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int window = min(kWindow, l.num_nvl_slots);
    const unsigned below = (1u << lane) - 1;
    if (tid < P) s_nvl_sent[tid] = 0;
    int nvl_published = 0;  // thread j < P: the tail last published to local rank j
    __syncthreads();

    for (int an = 0; an < NN; ++an) {
        const RecvSegment seg = internode_forward_segment(c.recv_rdma_channel_prefix_matrix,
                                                          c.recv_rdma_rank_prefix_sum, l.num_channels, an, channel);
        const int src_pe = an * P + me_local;
        int processed = 0, head_published = 0, seen_tail = 0;  // seen_tail / head_published: thread 0
        while (processed < seg.count) {
            if (warp == 0) {
                __syncwarp();
                if (lane == 0 && seen_tail <= processed)  // the next chunk of the chain
                    seen_tail = wait_chunk_end(a, channel, an, processed, "internode dispatch", WaitRole::kForwarderTokens,
                                               src_pe);
                __syncwarp();  // orders lane 0's test of the tail before the other lanes' reads of the slots
                const int avail = __shfl_sync(0xffffffffu, min(min(seen_tail - processed, window), seg.count - processed), 0);
                int bits = 0;
                if (lane < avail)
                    bits = ptx::ld_na_global(rdma_int(a, l.rdma_recv(channel, an, processed + lane) + l.msg_bits()));
                for (int j = 0; j < P; ++j) {
                    const bool goes = (bits >> j) & 1;
                    const unsigned mask = __ballot_sync(0xffffffffu, goes);
                    const int base = s_nvl_sent[j];
                    if (lane < avail) s_slot[lane][j] = goes ? base + __popc(mask & below) : -1;
                    const int n = __popc(mask);
                    if (lane == 0 && n > 0) {
                        // Room for n more messages in ring (channel, me_local) at local rank j.
                        const int* head = reinterpret_cast<const int*>(nvl(a, me_local, l.nvl_head(channel, j)));
                        SpinWait wait(c.timeout_ns);
                        int h;
                        while (ring_free_slots(base, h = ptx::ld_acquire_sys_global(head), l.num_nvl_slots) < n) {
                            if (wait.expired())
                                report_timeout_and_trap("internode dispatch", WaitRole::kForwarderSlots, c.rank, channel,
                                                        me_node * P + j, base + n - l.num_nvl_slots, h);
                        }
                    }
                    __syncwarp();
                    if (lane == 0) s_nvl_sent[j] = base + n;
                    __syncwarp();
                }
                const int64_t m = static_cast<int64_t>(seg.row_begin) + processed + lane;
                if (c.send_nvl_head != nullptr && lane < avail && m < c.send_nvl_head_rows) {
                    for (int j = 0; j < P; ++j) c.send_nvl_head[m * P + j] = s_slot[lane][j];
                }
                if (lane == 0) s_count = avail;
            }
            __syncthreads();
            const int count = s_count;
            const int64_t msg_int4 = l.msg_bytes / 16;
            for (int item = warp; item < count * P; item += kNumInternodeWarps) {
                const int k = item / P, j = item % P;
                const int slot = s_slot[k][j];
                if (slot < 0) continue;
                const int4* src = reinterpret_cast<const int4*>(a.tr.local(l.rdma_recv(channel, an, processed + k)));
                int4* dst = reinterpret_cast<int4*>(nvl(a, j, l.nvl_recv(channel, me_local, slot)));
                warp_copy_ring_to_global<2>(dst, src, msg_int4, lane);
            }
            // All copies (and reads of the RDMA slots) are done before the tails / head move.
            __syncthreads();
            processed += count;
            if (tid < P && s_nvl_sent[tid] != nvl_published) {
                nvl_published = s_nvl_sent[tid];
                ptx::st_release_sys_global(reinterpret_cast<int*>(nvl(a, tid, l.nvl_tail(channel, me_local))),
                                           nvl_published);
            }
            // One head update per chunk consumed (a chunk is at most num_max_rdma_send messages, and the
            // sender waits for room for one chunk, so it is never starved).
            if (tid == 0 && processed >= seen_tail) {
                a.tr.signal(src_pe, l.rdma_head(channel, me_node), static_cast<uint64_t>(processed - head_published),
                            transport::SignalOp::kAdd);
                head_published = processed;
            }
        }
    }
}

// One warp unpacks the message at `msg` into output row `row` (source node `src_node`).
template <typename Tr>
__device__ __forceinline__ void unpack_dispatch(const Args<Tr>& a, const char* msg, int64_t row, int src_node, int lane) {
    const deep_ep_internode_call& c = a.c;
    const InternodeLayout& l = a.l;
    const int64_t row_int4 = l.row_bytes / 16;
    warp_copy_ring_to_global(static_cast<int4*>(c.recv_x) + row * row_int4, reinterpret_cast<const int4*>(msg),
                             row_int4, lane);
    const int* meta = reinterpret_cast<const int*>(msg + l.msg_src_idx());
    if (lane == 0) {
        if (c.recv_src_idx != nullptr) c.recv_src_idx[row] = ptx::ld_na_global(meta);
        if (c.recv_src_meta != nullptr) {
            int* out = reinterpret_cast<int*>(c.recv_src_meta + row * 8);
            out[0] = src_node;
            out[1] = ptx::ld_na_global(meta + 1);
        }
    }
    if (c.recv_topk_idx != nullptr && lane < l.num_topk) {
        const int E_loc = c.num_experts / c.num_ranks;
        const int e = ptx::ld_na_global(reinterpret_cast<const int*>(msg + l.msg_topk_idx()) + lane);
        const int local = e - c.rank * E_loc;
        const bool is_local = e >= 0 && local >= 0 && local < E_loc;
        c.recv_topk_idx[row * l.num_topk + lane] = is_local ? local : -1;
        c.recv_topk_weights[row * l.num_topk + lane] =
            is_local ? __int_as_float(ptx::ld_na_global(reinterpret_cast<const int*>(msg + l.msg_weights()) + lane)) : 0.0f;
    }
    int* scales = static_cast<int*>(c.recv_x_scales);
    for (int i = lane; i < l.num_scales; i += 32)
        scales[row * l.num_scales + i] = ptx::ld_na_global(reinterpret_cast<const int*>(msg + l.msg_scales()) + i);
}

// Block role 2: one team per forwarder (local rank i) of this node.
template <typename Tr>
__device__ void dispatch_receiver(const Args<Tr>& a, int channel) {
    __shared__ volatile int s_tail[kMaxInternodeLocalRanks];
    const deep_ep_internode_call& c = a.c;
    const InternodeLayout& l = a.l;
    const int P = c.num_ranks_per_node, NN = l.num_nodes, me_local = my_local(a);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int team_warps = kNumInternodeWarps / P;
    const int i = warp / team_warps, wit = warp % team_warps;
    if (i >= P) return;
    const int* tail_ptr = reinterpret_cast<const int*>(nvl(a, me_local, l.nvl_tail(channel, i)));
    int* remote_head = reinterpret_cast<int*>(nvl(a, i, l.nvl_head(channel, me_local)));
    RingRows rows(c, channel, i);
    const int total = rows.total(NN);
    int consumed = 0;
    while (consumed < total) {
        if (wit == 0 && lane == 0)
            s_tail[i] = wait_at_least(tail_ptr, consumed + 1, c.timeout_ns, "internode dispatch",
                                      WaitRole::kDispatchReceiver, c.rank, channel, my_node(a) * P + i);
        team_sync(i + 1, team_warps);
        const int tail = s_tail[i];
        for (int idx = consumed + wit; idx < tail; idx += team_warps) {
            const int64_t row = rows.row(idx);
            // Rows past the output (num_worst_tokens overflow, flagged by notify) are dropped.
            if (row < c.num_recv_rows) unpack_dispatch(a, nvl(a, me_local, l.nvl_recv(channel, i, idx)), row, rows.node, lane);
        }
        team_sync(i + 1, team_warps);
        if (wit == 0 && lane == 0) ptx::st_release_sys_global(remote_head, tail);
        consumed = tail;
    }
}

template <typename Tr>
__global__ void __launch_bounds__(kNumInternodeThreads, 1) dispatch_kernel(Args<Tr> a) {
    const int channel = blockIdx.x / kInternodeBlocksPerChannel, role = blockIdx.x % kInternodeBlocksPerChannel;
    if (role == 0)
        dispatch_sender(a, channel);
    else if (role == 1)
        dispatch_forwarder(a, channel);
    else
        dispatch_receiver(a, channel);
}

// Rows [received, N) of the outputs and rows [M, M_rows) of send_nvl_head.
template <typename Tr>
__global__ void fill_trailing_kernel(Args<Tr> a) {
    const deep_ep_internode_call& c = a.c;
    const InternodeLayout& l = a.l;
    const int received = c.recv_gbl_rank_prefix_sum[c.num_ranks - 1];
    const int64_t row_int4 = l.row_bytes / 16;
    const int lane = threadIdx.x % 32;
    const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
    const int64_t first = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    for (int64_t row = min(received, c.num_recv_rows) + first; row < c.num_recv_rows; row += warps) {
        for (int64_t i = lane; i < row_int4; i += 32) static_cast<int4*>(c.recv_x)[row * row_int4 + i] = make_int4(0, 0, 0, 0);
        for (int i = lane; i < l.num_scales; i += 32) static_cast<int*>(c.recv_x_scales)[row * l.num_scales + i] = 0;
        if (c.recv_topk_idx != nullptr && lane < l.num_topk) {
            c.recv_topk_idx[row * l.num_topk + lane] = -1;
            c.recv_topk_weights[row * l.num_topk + lane] = 0.0f;
        }
        if (lane == 0 && c.recv_src_idx != nullptr) c.recv_src_idx[row] = -1;
        if (lane < 2 && c.recv_src_meta != nullptr) reinterpret_cast<int*>(c.recv_src_meta + row * 8)[lane] = 0;
    }
    if (c.send_nvl_head != nullptr) {
        const int forwarded = c.recv_rdma_rank_prefix_sum[l.num_nodes - 1];
        const int P = c.num_ranks_per_node;
        for (int64_t row = min(forwarded, c.send_nvl_head_rows) + first; row < c.send_nvl_head_rows; row += warps)
            if (lane < P) c.send_nvl_head[row * P + lane] = -1;
    }
}

// ------------------------------------------------------------------------------------------ combine

// Block role 0: this rank's received rows go back to their forwarders (local rank i), one team each.
template <typename Tr>
__device__ void combine_nvl_sender(const Args<Tr>& a, int channel) {
    __shared__ volatile int s_chunk[kMaxInternodeLocalRanks];
    const deep_ep_internode_call& c = a.c;
    const InternodeLayout& l = a.l;
    const int P = c.num_ranks_per_node, NN = l.num_nodes, me_local = my_local(a);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int team_warps = kNumInternodeWarps / P;
    const int i = warp / team_warps, wit = warp % team_warps;
    if (i >= P) return;
    const int* head = reinterpret_cast<const int*>(nvl(a, me_local, l.nvl_head(channel, i)));
    int* remote_tail = reinterpret_cast<int*>(nvl(a, i, l.nvl_tail(channel, me_local)));
    const int64_t row_int4 = l.row_bytes / 16;
    RingRows rows(c, channel, i);
    const int total = rows.total(NN);
    int sent = 0;
    while (sent < total) {
        if (wit == 0 && lane == 0) {
            SpinWait wait(c.timeout_ns);
            int h, free_slots;
            while ((free_slots = ring_free_slots(sent, h = ptx::ld_acquire_sys_global(head), l.num_nvl_slots)) < 1) {
                if (wait.expired())
                    report_timeout_and_trap("internode combine", WaitRole::kCombineSender, c.rank, channel,
                                            my_node(a) * P + i, sent + 1 - l.num_nvl_slots, h);
            }
            s_chunk[i] = min(min(c.num_max_nvl_send, total - sent), free_slots);
        }
        team_sync(i + 1, team_warps);
        const int chunk = s_chunk[i];
        for (int k = wit; k < chunk; k += team_warps) {
            const int idx = sent + k;
            const int64_t row = rows.row(idx);
            if (row >= c.num_recv_rows) continue;  // only after an overflowed num_worst_tokens dispatch
            char* msg = nvl(a, i, l.nvl_recv(channel, me_local, idx));
            warp_copy_nc_to_global<2>(reinterpret_cast<int4*>(msg), static_cast<const int4*>(c.x) + row * row_int4,
                                      row_int4, lane);
            if (lane < l.num_topk)
                reinterpret_cast<float*>(msg + l.msg_weights())[lane] =
                    c.topk_weights != nullptr ? c.topk_weights[row * l.num_topk + lane] : 0.0f;
        }
        team_sync(i + 1, team_warps);
        sent += chunk;
        if (wit == 0 && lane == 0) ptx::st_release_sys_global(remote_tail, sent);
    }
}

// Block role 1: per source node a, one warp per token of stream (a, channel): the node's partial sum.
template <typename Tr>
__device__ void combine_forwarder(const Args<Tr>& a, int channel) {
    __shared__ int s_nvl_head[kMaxInternodeLocalRanks];
    __shared__ int64_t s_row[kNumInternodeWarps][kMaxInternodeLocalRanks];
    __shared__ int s_count;
    const deep_ep_internode_call& c = a.c;
    const InternodeLayout& l = a.l;
    const int P = c.num_ranks_per_node, NN = l.num_nodes, me_local = my_local(a), me_node = my_node(a);
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int window = min(kNumInternodeWarps, l.num_nvl_slots);
    const int64_t row_int4 = l.row_bytes / 16;
    if (tid < P) s_nvl_head[tid] = 0;
    int nvl_published = 0;  // thread j < P
    __syncthreads();

    for (int an = 0; an < NN; ++an) {
        const RecvSegment seg = internode_forward_segment(c.recv_rdma_channel_prefix_matrix,
                                                          c.recv_rdma_rank_prefix_sum, l.num_channels, an, channel);
        const int src_pe = an * P + me_local;
        const int64_t head = l.rdma_head(channel, an);
        const int Qr = l.num_rdma_slots;
        // Load/store reachable (NVLink, this rank): partials are written in place; else staged and sent.
        const bool direct = a.tr.peer_ptr(src_pe, 0) != nullptr;
        int sent = 0;
        while (sent < seg.count) {
            if (tid == 0) {
                // At least one free slot; a window never wraps around the ring (one contiguous put).
                const int h = static_cast<int>(wait_signal_at_least(
                    a.tr, head, static_cast<uint64_t>(sent + 1 > Qr ? sent + 1 - Qr : 0), c.timeout_ns,
                    "internode combine", WaitRole::kForwarderSlots, c.rank, channel, src_pe));
                s_count = min(min(min(window, seg.count - sent), ring_free_slots(sent, h, Qr)), Qr - sent % Qr);
            }
            __syncthreads();
            const int count = s_count;
            if (warp < count) {
                const int k = sent + warp;
                const int64_t m = static_cast<int64_t>(seg.row_begin) + k;
                // (m < rows unless an overflowed num_worst_tokens dispatch, which the host reports first)
                const int slot = lane < P && m < c.send_nvl_head_rows ? c.send_nvl_head[m * P + lane] : -1;
                if (slot >= 0)
                    wait_at_least(reinterpret_cast<const int*>(nvl(a, me_local, l.nvl_tail(channel, lane))), slot + 1,
                                  c.timeout_ns, "internode combine", WaitRole::kForwarderTokens, c.rank, channel,
                                  me_node * P + lane);
                if (lane < P) s_row[warp][lane] = slot >= 0 ? l.nvl_recv(channel, lane, slot) : -1;
                __syncwarp();
                const char* own = nvl(a, me_local, 0);
                char* out = direct ? a.tr.peer_ptr(src_pe, l.rdma_recv(channel, me_node, k))
                                   : a.tr.local(l.rdma_send(channel, an, k));
                for (int64_t q = lane; q < row_int4; q += 32) {
                    float acc[8];
#pragma unroll
                    for (int e = 0; e < 8; ++e) acc[e] = 0.0f;
                    for (int j = 0; j < P; ++j) {
                        const int64_t r = s_row[warp][j];
                        if (r >= 0) add_bf16x8(acc, ptx::ld_na_global_v4(reinterpret_cast<const int4*>(own + r) + q));
                    }
                    reinterpret_cast<int4*>(out)[q] = pack_bf16x8(acc);
                }
                if (lane < l.num_topk) {
                    float w = 0.0f;
                    for (int j = 0; j < P; ++j) {
                        const int64_t r = s_row[warp][j];
                        if (r >= 0) w += __int_as_float(ptx::ld_na_global(reinterpret_cast<const int*>(own + r + l.msg_weights()) + lane));
                    }
                    reinterpret_cast<float*>(out + l.msg_weights())[lane] = w;
                }
                if (slot >= 0) atomicMax(&s_nvl_head[lane], slot + 1);
            }
            __syncthreads();
            // The window's partials go out with its tail: one put-with-signal, or the tail alone.
            if (warp == 0) {
                const int64_t tail = l.rdma_tail(channel, me_node, sent);
                const uint64_t end = static_cast<uint64_t>(sent + count);
                if (direct) {
                    if (lane == 0) a.tr.signal(src_pe, tail, end, transport::SignalOp::kSet);
                } else {
                    a.tr.put_signal_warp(src_pe, l.rdma_recv(channel, me_node, sent), a.tr.local(l.rdma_send(channel, an, sent)),
                                         count * l.msg_bytes, tail, end, transport::SignalOp::kSet, lane);
                }
            }
            sent += count;
            if (tid < P && s_nvl_head[tid] != nvl_published) {
                nvl_published = s_nvl_head[tid];
                ptx::st_release_sys_global(reinterpret_cast<int*>(nvl(a, tid, l.nvl_head(channel, me_local))), nvl_published);
            }
            __syncthreads();
        }
    }
}

// Block role 2: one warp per token of this channel: biases + the partials of its nodes.
template <typename Tr>
__device__ void combine_reducer(const Args<Tr>& a, int channel) {
    __shared__ int s_head[kMaxInternodeNodes];
    __shared__ int s_tail[kMaxInternodeNodes];  // [b]: node b's chunks up to here have arrived
    __shared__ int64_t s_row[kNumInternodeWarps][kMaxInternodeNodes];
    const deep_ep_internode_call& c = a.c;
    const InternodeLayout& l = a.l;
    const int P = c.num_ranks_per_node, NN = l.num_nodes, me_node = my_node(a), me_local = my_local(a);
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int window = min(kNumInternodeWarps, l.num_rdma_slots);
    const int64_t row_int4 = l.row_bytes / 16;
    const ChannelRange range = channel_range(c.num_tokens, l.num_channels, channel);
    const int4* bias_0 = static_cast<const int4*>(c.bias_0);
    const int4* bias_1 = static_cast<const int4*>(c.bias_1);
    if (tid < NN) s_head[tid] = s_tail[tid] = 0;
    int published = 0;  // thread b < NN
    __syncthreads();

    for (int batch = range.begin; batch < range.end; batch += window) {
        // Lane b of warp 0 follows node b's chain of chunks up to the last slot the batch reads from it
        // (slots grow with the token).
        if (warp == 0 && lane < NN) {
            int need = 0;
            for (int u = batch; u < min(batch + window, range.end); ++u)
                need = max(need, c.send_rdma_head[static_cast<int64_t>(u) * NN + lane] + 1);
            int arrived = s_tail[lane];
            while (arrived < need)
                arrived = wait_chunk_end(a, channel, lane, arrived, "internode combine", WaitRole::kCombineReceiver,
                                         lane * P + me_local);
            s_tail[lane] = arrived;
        }
        __syncthreads();
        const int t = batch + warp;
        if (warp < window && t < range.end) {
            const int slot = lane < NN ? c.send_rdma_head[static_cast<int64_t>(t) * NN + lane] : -1;
            if (lane < NN) s_row[warp][lane] = slot >= 0 ? l.rdma_recv(channel, lane, slot) : -1;
            __syncwarp();
            const char* own = a.tr.local(0);
            for (int64_t q = lane; q < row_int4; q += 32) {
                float acc[8];
#pragma unroll
                for (int e = 0; e < 8; ++e) acc[e] = 0.0f;
                if (bias_0 != nullptr) add_bf16x8(acc, ptx::ld_nc_global_v4(bias_0 + t * row_int4 + q));
                if (bias_1 != nullptr) add_bf16x8(acc, ptx::ld_nc_global_v4(bias_1 + t * row_int4 + q));
                for (int b = 0; b < NN; ++b) {
                    const int64_t r = s_row[warp][b];
                    if (r >= 0) add_bf16x8(acc, ptx::ld_na_global_v4(reinterpret_cast<const int4*>(own + r) + q));
                }
                static_cast<int4*>(c.recv_x)[t * row_int4 + q] = pack_bf16x8(acc);
            }
            if (c.recv_topk_weights != nullptr && lane < l.num_topk) {
                float w = 0.0f;
                for (int b = 0; b < NN; ++b) {
                    const int64_t r = s_row[warp][b];
                    if (r >= 0) w += __int_as_float(ptx::ld_na_global(reinterpret_cast<const int*>(own + r + l.msg_weights()) + lane));
                }
                c.recv_topk_weights[static_cast<int64_t>(t) * l.num_topk + lane] = w;
            }
            if (slot >= 0) atomicMax(&s_head[lane], slot + 1);
        }
        // The batch's reads are done before the heads move.
        __syncthreads();
        if (tid < NN && s_head[tid] != published) {
            a.tr.signal(tid * P + me_local, l.rdma_head(channel, me_node), static_cast<uint64_t>(s_head[tid] - published),
                        transport::SignalOp::kAdd);
            published = s_head[tid];
        }
        __syncthreads();
    }
}

template <typename Tr>
__global__ void __launch_bounds__(kNumInternodeThreads, 1) combine_kernel(Args<Tr> a) {
    const int channel = blockIdx.x / kInternodeBlocksPerChannel, role = blockIdx.x % kInternodeBlocksPerChannel;
    if (role == 0)
        combine_nvl_sender(a, channel);
    else if (role == 1)
        combine_forwarder(a, channel);
    else
        combine_reducer(a, channel);
}

// ------------------------------------------------------------------------------------------ host side

// The layout of a call (the same on every rank; dispatch and its notify use the same one).
inline InternodeLayout call_layout(const deep_ep_internode_call& c) {
    const bool is_combine = c.op == DEEP_EP_INTERNODE_COMBINE;
    const int P = c.num_ranks_per_node > 0 ? c.num_ranks_per_node : 1;
    return internode_layout(c.num_ranks, P, c.num_channels, c.num_rdma_slots, c.num_nvl_slots,
                            c.num_ranks > 0 ? c.num_experts / c.num_ranks : 0, c.row_bytes, c.num_topk, c.num_scales,
                            is_combine);
}

// Checks every value a kernel relies on; the messages name the argument.
inline void check_call(const deep_ep_internode_call& c) {
    const std::string where = "deep_ep internode: ";
    host_check(c.num_ranks_per_node >= 1 && c.num_ranks_per_node <= kMaxInternodeLocalRanks,
               where + "ranks per node must be in [1, " + std::to_string(kMaxInternodeLocalRanks) + "], got " +
                   std::to_string(c.num_ranks_per_node));
    host_check(c.num_ranks % c.num_ranks_per_node == 0, where + "num_ranks must be a multiple of ranks per node");
    const int nodes = c.num_ranks / c.num_ranks_per_node;
    host_check(nodes >= 2 && nodes <= kMaxInternodeNodes,
               where + "the number of nodes must be in [2, " + std::to_string(kMaxInternodeNodes) + "], got " +
                   std::to_string(nodes));
    host_check(c.rank >= 0 && c.rank < c.num_ranks, where + "bad rank");
    host_check(c.num_channels >= 1 && c.num_channels <= kMaxChannels,
               where + "the number of channels (Config.num_sms / 2) must be in [1, " + std::to_string(kMaxChannels) +
                   "], got " + std::to_string(c.num_channels));
    host_check(c.num_rdma_slots >= 1 && c.num_nvl_slots >= 1,
               where + "num_max_rdma_chunked_recv_tokens and num_max_nvl_chunked_recv_tokens must be >= 1");
    host_check(c.num_max_rdma_send >= 1 && c.num_max_rdma_send <= c.num_rdma_slots,
               where + "num_max_rdma_chunked_send_tokens must be in [1, num_max_rdma_chunked_recv_tokens], got " +
                   std::to_string(c.num_max_rdma_send) + " of " + std::to_string(c.num_rdma_slots));
    host_check(c.num_max_nvl_send >= 1, where + "num_max_nvl_chunked_send_tokens must be >= 1");
    host_check(c.row_bytes > 0 && c.row_bytes % 16 == 0,
               where + "hidden * element size must be a positive multiple of 16 bytes, got " + std::to_string(c.row_bytes));
    host_check(c.num_topk >= 0 && c.num_topk <= kMaxTopK, where + "num_topk must be in [0, 32]");
    host_check(c.num_scales >= 0, where + "bad num_scales");
    host_check(c.num_experts >= 0 && c.num_experts % c.num_ranks == 0, where + "num_experts must be a multiple of num_ranks");
    host_check(c.num_experts / c.num_ranks <= kMaxLocalExperts, where + "too many experts per rank");
    host_check(c.num_tokens >= 0 && c.num_recv_rows >= 0, where + "negative token counts");
}

template <typename Tr>
int max_blocks_per_sm(bool combine) {
    int per_sm = 0;
    if (combine)
        DEEP_EP_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, combine_kernel<Tr>, kNumInternodeThreads, 0));
    else
        DEEP_EP_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, dispatch_kernel<Tr>, kNumInternodeThreads, 0));
    return per_sm;
}

// Launches the kernels of `c.op` on `stream`. The transport and the NVL pointers are already set.
template <typename Tr>
void launch(const deep_ep_internode_call& c, const Tr& tr, cudaStream_t stream) {
    check_call(c);
    Args<Tr> a;
    a.c = c;
    a.l = call_layout(c);
    a.tr = tr;
    const int grid = c.num_channels * kInternodeBlocksPerChannel;
    if (c.op == DEEP_EP_INTERNODE_NOTIFY) {
        DEEP_EP_LAUNCH(notify_kernel<Tr>, 1, kNumNotifyThreads, 0, stream, a);
        DEEP_EP_CHECK_LAUNCH(notify_kernel);
        return;
    }
    // Every block of the ring protocol must be resident at once.
    int device = 0, sms = 0;
    DEEP_EP_CUDA_CHECK(cudaGetDevice(&device));
    DEEP_EP_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    const bool combine = c.op == DEEP_EP_INTERNODE_COMBINE;
    const int per_sm = max_blocks_per_sm<Tr>(combine);
    host_check(static_cast<int64_t>(grid) <= static_cast<int64_t>(per_sm) * sms,
               std::string("deep_ep internode: the ") + (combine ? "combine" : "dispatch") + " kernel needs " +
                   std::to_string(grid) + " blocks (3 per channel, Config.num_sms / 2 channels) resident at once, but "
                   "this GPU fits " + std::to_string(per_sm * sms) + "; use a smaller num_sms");
    if (combine || c.cached) {
        DEEP_EP_LAUNCH(reset_kernel<Tr>, 1, kNumNotifyThreads, 0, stream, a);
        DEEP_EP_CHECK_LAUNCH(reset_kernel);
    }
    if (combine) {
        DEEP_EP_LAUNCH(combine_kernel<Tr>, grid, kNumInternodeThreads, 0, stream, a);
        DEEP_EP_CHECK_LAUNCH(combine_kernel);
        return;
    }
    DEEP_EP_LAUNCH(dispatch_kernel<Tr>, grid, kNumInternodeThreads, 0, stream, a);
    DEEP_EP_CHECK_LAUNCH(dispatch_kernel);
    if (c.fill_trailing_rows && (c.num_recv_rows > 0 || c.send_nvl_head_rows > 0)) {
        constexpr int kFillThreads = 256;
        const int64_t rows = c.num_recv_rows > c.send_nvl_head_rows ? c.num_recv_rows : c.send_nvl_head_rows;
        const int blocks = static_cast<int>(rows < 132 * 8 ? (rows + 7) / 8 : 132);
        DEEP_EP_LAUNCH(fill_trailing_kernel<Tr>, blocks, kFillThreads, 0, stream, a);
        DEEP_EP_CHECK_LAUNCH(fill_trailing_kernel);
    }
}

}  // namespace internode
}  // namespace deep_ep

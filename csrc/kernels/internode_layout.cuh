// Layout of the two internode regions and the token message, shared by the host (sizes, checks, CPU
// unit tests through deep_ep_host_internode_layout) and the kernels (internode.cuh). Free of CUDA calls.
//
// RDMA region (the transport's buffer; a peer's copy of `offset` is reached through the transport):
//
//   region      elements                    used by
//   sync        [R] u64 + epoch u64          barrier words: [s] = the barriers rank s reached (it ADDs 1
//                                            per barrier); then this rank's own count. Never cleared.
//   meta_in     [R src][W] int               notify: what src sends to this rank (see MetaFields)
//   meta_out    [R dst][W] int               notify: staging of what this rank sends to dst
//   rdma_head   [C][NN] u64                  [c][x]: slots of MY ring at node x's peer that x released
//                                            (x ADDs what it released since its last update)
//   rdma_tail   [C][NN][Qr] u64              [c][x][s]: end of the chunk that node x's peer published
//                                            into my ring (c, x) starting at slot s (one put-with-signal
//                                            SETs it); chunks chain: the next starts at that end
//   rdma_send   [C][NN][Qr][msg]             staging of messages towards node x (network puts only)
//   rdma_recv   [C][NN][Qr][msg]             ring (c, x): messages from node x's peer
//
// NVL region (plain loads/stores between the P ranks of a node; same conventions, indexed by local rank):
//
//   nvl_head    [C][P] int                   [c][y]: slots of my ring at local rank y that y released
//   nvl_tail    [C][P] int                   [c][y]: messages local rank y published into my ring (c, y)
//   nvl_recv    [C][P][Qn][msg]              ring (c, y): messages from local rank y
//
// "The peer of node x" is the rank of node x with this rank's local index (RDMA goes only between
// ranks of equal local index). Dispatch: senders write rings at forwarders; combine: the reverse.
// Every word of the RDMA hop that a peer writes is a 64-bit NVSHMEM signal word (transport.cuh). Why
// one tail word per chunk start and not one counter: two puts-with-signal to one PE are not ordered
// with each other, so a single counter SET by each could claim a chunk whose data has not landed;
// a chunk's own word is written by its own put-with-signal, after its data. A word value v at slot s
// is current iff s < v <= s + Qr (earlier laps left values <= s there).
//
// Message (one per token and hop, 16-byte multiple):
//   dispatch  [row_bytes of x][int src_idx, int nvl bits, int topk_idx[K] (global ids), float w[K],
//             int scales[S]] padded to 16
//   combine   [row_bytes bf16 row (a partial sum on the RDMA hop)][float w[K]] padded to 16
#pragma once

#include <cstdint>

#include "buffer_layout.cuh"
#include "config.cuh"

namespace deep_ep {

// Nodes the internode kernels handle (the dispatch sender has one warp team per destination node:
// teams of one warp from 9 nodes on, so named barriers stay within ids 1..8).
constexpr int kMaxInternodeNodes = 16;
// Ranks per node (NVL peers); the token's NVL bitmask is an int.
constexpr int kMaxInternodeLocalRanks = kMaxNvlRanks;
// Threads of the internode dispatch / combine blocks (3 blocks per channel): 16 warps, so that the
// kernels get 128 registers per thread and do not spill.
constexpr int kNumInternodeThreads = 512;
constexpr int kNumInternodeWarps = kNumInternodeThreads / 32;
constexpr int kInternodeBlocksPerChannel = 3;

struct InternodeLayout {
    int num_ranks, num_ranks_per_node, num_nodes, num_channels;
    int num_rdma_slots, num_nvl_slots;
    int num_local_experts;
    int64_t msg_bytes;
    int64_t row_bytes;
    int num_topk, num_scales;
    bool is_combine;

    enum RdmaRegion { kSync = 0, kMetaIn, kMetaOut, kRdmaHead, kRdmaTail, kRdmaSend, kRdmaRecv, kRdmaEnd, kNumRdma };
    enum NvlRegion { kNvlHead = 0, kNvlTail, kNvlRecv, kNvlEnd, kNumNvl };

    int64_t rdma_offsets[kNumRdma];
    int64_t nvl_offsets[kNumNvl];

    // ---- notify metadata per (src, dst), in ints
    DEEP_EP_HD int meta_gbl() const { return 0; }                                      // [C] tokens src -> dst per channel
    DEEP_EP_HD int meta_rdma() const { return num_channels; }                          // [C] src tokens needing dst's node
    DEEP_EP_HD int meta_per_rank() const { return 2 * num_channels; }                  // [R] src's tokens per rank
    DEEP_EP_HD int meta_expert() const { return 2 * num_channels + num_ranks; }        // [E_loc] for dst's experts
    DEEP_EP_HD int meta_words() const {
        return static_cast<int>(align_up(2 * num_channels + num_ranks + num_local_experts, 4));
    }

    DEEP_EP_HD int64_t rdma_region_bytes(int region) const {
        const int64_t r = num_ranks, c = num_channels, nn = num_nodes;
        switch (region) {
            case kSync: return (r + 1) * 8;
            case kMetaIn:
            case kMetaOut: return r * meta_words() * 4;
            case kRdmaHead: return c * nn * 8;
            case kRdmaTail: return c * nn * num_rdma_slots * 8;
            case kRdmaSend:
            case kRdmaRecv: return c * nn * num_rdma_slots * msg_bytes;
            default: return 0;
        }
    }
    DEEP_EP_HD int64_t nvl_region_bytes(int region) const {
        const int64_t c = num_channels, p = num_ranks_per_node;
        switch (region) {
            case kNvlHead:
            case kNvlTail: return c * p * 4;
            case kNvlRecv: return c * p * num_nvl_slots * msg_bytes;
            default: return 0;
        }
    }

    DEEP_EP_HD void finalize() {
        int64_t pos = 0;
        for (int i = 0; i < kNumRdma; ++i) {
            rdma_offsets[i] = pos;
            pos += align_up(rdma_region_bytes(i), kRegionAlignBytes);
        }
        pos = 0;
        for (int i = 0; i < kNumNvl; ++i) {
            nvl_offsets[i] = pos;
            pos += align_up(nvl_region_bytes(i), kRegionAlignBytes);
        }
    }

    DEEP_EP_HD int64_t rdma_bytes() const { return rdma_offsets[kRdmaEnd]; }
    DEEP_EP_HD int64_t nvl_bytes() const { return nvl_offsets[kNvlEnd]; }

    // ---- byte offsets inside the RDMA region (the same on every rank: symmetric)
    DEEP_EP_HD int64_t sync_word(int src) const { return rdma_offsets[kSync] + static_cast<int64_t>(src) * 8; }
    DEEP_EP_HD int64_t epoch_word() const { return rdma_offsets[kSync] + static_cast<int64_t>(num_ranks) * 8; }
    DEEP_EP_HD int64_t meta_in(int src) const {
        return rdma_offsets[kMetaIn] + static_cast<int64_t>(src) * meta_words() * 4;
    }
    DEEP_EP_HD int64_t meta_out(int dst) const {
        return rdma_offsets[kMetaOut] + static_cast<int64_t>(dst) * meta_words() * 4;
    }
    DEEP_EP_HD int64_t rdma_head(int channel, int node) const {
        return rdma_offsets[kRdmaHead] + (static_cast<int64_t>(channel) * num_nodes + node) * 8;
    }
    DEEP_EP_HD int64_t rdma_tail(int channel, int node, int slot) const {
        return rdma_offsets[kRdmaTail] +
               ((static_cast<int64_t>(channel) * num_nodes + node) * num_rdma_slots + slot % num_rdma_slots) * 8;
    }
    DEEP_EP_HD int64_t rdma_slot(int channel, int node, int slot) const {
        return ((static_cast<int64_t>(channel) * num_nodes + node) * num_rdma_slots + slot % num_rdma_slots) * msg_bytes;
    }
    DEEP_EP_HD int64_t rdma_send(int channel, int node, int slot) const {
        return rdma_offsets[kRdmaSend] + rdma_slot(channel, node, slot);
    }
    DEEP_EP_HD int64_t rdma_recv(int channel, int node, int slot) const {
        return rdma_offsets[kRdmaRecv] + rdma_slot(channel, node, slot);
    }

    // ---- byte offsets inside the NVL region
    DEEP_EP_HD int64_t nvl_head(int channel, int local) const {
        return nvl_offsets[kNvlHead] + (static_cast<int64_t>(channel) * num_ranks_per_node + local) * 4;
    }
    DEEP_EP_HD int64_t nvl_tail(int channel, int local) const {
        return nvl_offsets[kNvlTail] + (static_cast<int64_t>(channel) * num_ranks_per_node + local) * 4;
    }
    DEEP_EP_HD int64_t nvl_recv(int channel, int local, int slot) const {
        return nvl_offsets[kNvlRecv] +
               ((static_cast<int64_t>(channel) * num_ranks_per_node + local) * num_nvl_slots + slot % num_nvl_slots) *
                   msg_bytes;
    }

    // ---- inside a message (byte offsets from its start)
    DEEP_EP_HD int64_t msg_src_idx() const { return row_bytes; }
    DEEP_EP_HD int64_t msg_bits() const { return row_bytes + 4; }
    DEEP_EP_HD int64_t msg_topk_idx() const { return row_bytes + 8; }
    DEEP_EP_HD int64_t msg_weights() const { return is_combine ? row_bytes : row_bytes + 8 + 4 * num_topk; }
    DEEP_EP_HD int64_t msg_scales() const { return row_bytes + 8 + 8 * num_topk; }
};

DEEP_EP_HD int64_t internode_msg_bytes(int64_t row_bytes, int num_topk, int num_scales, bool is_combine) {
    const int64_t tail = is_combine ? 4 * static_cast<int64_t>(num_topk)
                                    : 4 * (2 + 2 * static_cast<int64_t>(num_topk) + num_scales);
    return row_bytes + align_up(tail, 16);
}

DEEP_EP_HD InternodeLayout internode_layout(int num_ranks, int num_ranks_per_node, int num_channels,
                                            int num_rdma_slots, int num_nvl_slots, int num_local_experts,
                                            int64_t row_bytes, int num_topk, int num_scales, bool is_combine) {
    InternodeLayout l;
    l.num_ranks = num_ranks;
    l.num_ranks_per_node = num_ranks_per_node;
    l.num_nodes = num_ranks_per_node > 0 ? num_ranks / num_ranks_per_node : 0;
    l.num_channels = num_channels;
    l.num_rdma_slots = num_rdma_slots;
    l.num_nvl_slots = num_nvl_slots;
    l.num_local_experts = num_local_experts;
    l.row_bytes = row_bytes;
    l.num_topk = num_topk;
    l.num_scales = is_combine ? 0 : num_scales;
    l.is_combine = is_combine;
    l.msg_bytes = internode_msg_bytes(row_bytes, num_topk, l.num_scales, is_combine);
    l.finalize();
    return l;
}

// Rows a receiver gets from (source s, channel c) from the handle: absolute start in recv_x from
// recv_gbl_channel_prefix_matrix [R, C], end from the next channel or the source's inclusive total.
DEEP_EP_HD RecvSegment internode_recv_segment(const int* recv_gbl_channel_prefix_matrix,
                                              const int* recv_gbl_rank_prefix_sum, int num_channels, int src,
                                              int channel) {
    const int begin = recv_gbl_channel_prefix_matrix[src * num_channels + channel];
    const int end = channel + 1 < num_channels ? recv_gbl_channel_prefix_matrix[src * num_channels + channel + 1]
                                               : recv_gbl_rank_prefix_sum[src];
    RecvSegment s;
    s.row_begin = begin;
    s.count = end - begin;
    return s;
}

// Tokens a forwarder gets over RDMA from node a on channel c, and the handle row of the first one
// (rows: source node, then source token): from recv_rdma_channel_prefix_matrix [NN, C] (inclusive)
// and recv_rdma_rank_prefix_sum [NN] (inclusive).
DEEP_EP_HD RecvSegment internode_forward_segment(const int* recv_rdma_channel_prefix_matrix,
                                                 const int* recv_rdma_rank_prefix_sum, int num_channels, int node,
                                                 int channel) {
    const int* row = recv_rdma_channel_prefix_matrix + node * num_channels;
    const int start = channel > 0 ? row[channel - 1] : 0;
    const int node_begin = node > 0 ? recv_rdma_rank_prefix_sum[node - 1] : 0;
    RecvSegment s;
    s.row_begin = node_begin + start;
    s.count = row[channel] - start;
    return s;
}

}  // namespace deep_ep

// Index math shared by the host (sizes, checks, CPU unit tests) and the kernels: channel ranges,
// receive segments, ring arithmetic, and the layout of a rank's NVLink buffer. Everything here is
// __host__ __device__ and free of CUDA calls, so the host library exports it for tests.
#pragma once

#include <cstdint>

#include "config.cuh"

#ifdef __CUDACC__
#define DEEP_EP_HD __host__ __device__ __forceinline__
#else
#define DEEP_EP_HD inline
#endif

namespace deep_ep {

DEEP_EP_HD int64_t align_up(int64_t value, int64_t alignment) {
    return (value + alignment - 1) / alignment * alignment;
}

DEEP_EP_HD int ceil_div(int a, int b) { return (a + b - 1) / b; }

// A rank's tokens are split into `num_channels` contiguous ranges of ceil(T / C) tokens; the last
// channels may be short or empty (docs/semantics.md, "Channels").
struct ChannelRange {
    int begin;
    int end;
};

DEEP_EP_HD ChannelRange channel_range(int num_tokens, int num_channels, int channel) {
    const int per = num_tokens > 0 ? ceil_div(num_tokens, num_channels) : 0;
    const int64_t begin = static_cast<int64_t>(per) * channel;
    const int64_t end = begin + per;
    ChannelRange r;
    r.begin = static_cast<int>(begin < num_tokens ? begin : num_tokens);
    r.end = static_cast<int>(end < num_tokens ? end : num_tokens);
    return r;
}

// Rows of recv_x that (source `src`, channel `channel`) fills on rank `rank`, from the handle:
// `rank_prefix_matrix` [R, R] (inclusive over sources) and `recv_channel_prefix_matrix` [R, C]
// (exclusive over channels, relative to the source's segment). The same rows are what `rank` sends
// back to `src` on that channel in combine, in the same order.
struct RecvSegment {
    int row_begin;
    int count;
};

DEEP_EP_HD RecvSegment recv_segment(const int* rank_prefix_matrix, const int* recv_channel_prefix_matrix,
                                    int num_ranks, int num_channels, int rank, int src, int channel) {
    const int seg_begin = src > 0 ? rank_prefix_matrix[(src - 1) * num_ranks + rank] : 0;
    const int seg_end = rank_prefix_matrix[src * num_ranks + rank];
    const int start = recv_channel_prefix_matrix[src * num_channels + channel];
    const int end = channel + 1 < num_channels ? recv_channel_prefix_matrix[src * num_channels + channel + 1]
                                               : seg_end - seg_begin;
    RecvSegment s;
    s.row_begin = seg_begin + start;
    s.count = end - start;
    return s;
}

// Free slots of a ring of `capacity` slots whose sender has published `tail` and whose receiver has
// released everything before `head` (both count slots since the start of the operation).
DEEP_EP_HD int ring_free_slots(int tail, int head, int capacity) { return capacity - (tail - head); }

// Number of tokens an expert count is reported as, with `expert_alignment`.
DEEP_EP_HD int aligned_count(int count, int alignment) {
    return static_cast<int>(align_up(count, alignment));
}

// Layout of the NVLink data region of one rank (the `num_nvl_bytes` the user asked for; the barrier
// signals live after it). Every region is 128-byte aligned. Ring (c, s) is indexed c * R + s: it
// carries what source rank s sends to this rank on channel c. The receiver owns `head`, the sender
// owns `tail`; both live in the receiver's buffer, so the receiver polls local memory and the sender
// polls (and writes) remote memory.
//
//   region            elements                         used by
//   meta_rank_counts  [R src][R] int                   notify: every source's num_tokens_per_rank
//   meta_expert       [R src][E_loc] int               notify: counts for this rank's experts
//   meta_channel      [R src][C] int                   notify: inclusive channel prefix towards this rank
//   ring_head         [C][R] int                       receiver-owned: slots released
//   ring_tail         [C][R] int                       sender-owned: slots published
//   x                 [C][R][Q][row_bytes]             token rows (dispatch: x; combine: expert output)
//   src_idx           [C][R][Q] int                    dispatch: index of the token in its source
//   topk_idx          [C][R][Q][K] int                 dispatch: expert ids, already local (-1 elsewhere)
//   topk_weights      [C][R][Q][K] float               dispatch and combine
//   scales            [C][R][Q][S] 4 bytes             dispatch with FP8 scales
//
// R = num_ranks, C = num_channels, Q = num_slots (num_max_nvl_chunked_recv_tokens), K = num_topk
// (0 when absent), S = num_scales (0 without scales), E_loc = experts per rank (0 outside notify).
struct IntranodeLayout {
    int num_ranks;
    int num_channels;
    int num_slots;
    int num_local_experts;
    int64_t row_bytes;  // a multiple of 16
    int num_topk;
    int num_scales;
    bool with_src_idx;
    bool with_topk_idx;

    enum Region {
        kMetaRankCounts = 0,
        kMetaExpert,
        kMetaChannel,
        kRingHead,
        kRingTail,
        kX,
        kSrcIdx,
        kTopkIdx,
        kTopkWeights,
        kScales,
        kEnd,
        kNumRegions
    };

    DEEP_EP_HD int64_t num_rings() const { return static_cast<int64_t>(num_channels) * num_ranks; }

    DEEP_EP_HD int64_t region_bytes(int region) const {
        const int64_t r = num_ranks, slots = num_rings() * num_slots;
        switch (region) {
            case kMetaRankCounts: return r * r * 4;
            case kMetaExpert: return r * num_local_experts * 4;
            case kMetaChannel: return r * num_channels * 4;
            case kRingHead: return num_rings() * 4;
            case kRingTail: return num_rings() * 4;
            case kX: return slots * row_bytes;
            case kSrcIdx: return with_src_idx ? slots * 4 : 0;
            case kTopkIdx: return with_topk_idx ? slots * num_topk * 4 : 0;
            case kTopkWeights: return slots * num_topk * 4;
            case kScales: return slots * num_scales * 4;
            default: return 0;
        }
    }

    // Byte offsets of every region, filled by finalize() (the kernels read them from the kernel
    // parameters instead of recomputing the sum of the regions before).
    int64_t offsets[kNumRegions];

    DEEP_EP_HD void finalize() {
        int64_t pos = 0;
        for (int i = 0; i < kNumRegions; ++i) {
            offsets[i] = pos;
            pos += align_up(region_bytes(i), kRegionAlignBytes);
        }
    }

    // Byte offset of `region` from the start of the data region (kEnd gives the total size).
    DEEP_EP_HD int64_t offset(int region) const { return offsets[region]; }

    DEEP_EP_HD int64_t total_bytes() const { return offset(kEnd); }

    // ---- accessors (base = the rank's data region, local or a peer's)
    DEEP_EP_HD int64_t ring(int channel, int src) const {
        return static_cast<int64_t>(channel) * num_ranks + src;
    }
    DEEP_EP_HD int64_t slot_index(int channel, int src, int slot) const {
        return ring(channel, src) * num_slots + slot % num_slots;
    }
    DEEP_EP_HD int* meta_rank_counts(void* base, int src) const {
        return reinterpret_cast<int*>(static_cast<char*>(base) + offset(kMetaRankCounts)) + src * num_ranks;
    }
    DEEP_EP_HD int* meta_expert(void* base, int src) const {
        return reinterpret_cast<int*>(static_cast<char*>(base) + offset(kMetaExpert)) +
               static_cast<int64_t>(src) * num_local_experts;
    }
    DEEP_EP_HD int* meta_channel(void* base, int src) const {
        return reinterpret_cast<int*>(static_cast<char*>(base) + offset(kMetaChannel)) +
               static_cast<int64_t>(src) * num_channels;
    }
    DEEP_EP_HD int* ring_head(void* base) const {
        return reinterpret_cast<int*>(static_cast<char*>(base) + offset(kRingHead));
    }
    DEEP_EP_HD int* ring_tail(void* base) const {
        return reinterpret_cast<int*>(static_cast<char*>(base) + offset(kRingTail));
    }
    DEEP_EP_HD int* head(void* base, int channel, int src) const { return ring_head(base) + ring(channel, src); }
    DEEP_EP_HD int* tail(void* base, int channel, int src) const { return ring_tail(base) + ring(channel, src); }
    DEEP_EP_HD int4* x(void* base, int channel, int src, int slot) const {
        return reinterpret_cast<int4*>(static_cast<char*>(base) + offset(kX) +
                                       slot_index(channel, src, slot) * row_bytes);
    }
    DEEP_EP_HD int* src_idx(void* base, int channel, int src, int slot) const {
        return reinterpret_cast<int*>(static_cast<char*>(base) + offset(kSrcIdx)) + slot_index(channel, src, slot);
    }
    DEEP_EP_HD int* topk_idx(void* base, int channel, int src, int slot) const {
        return reinterpret_cast<int*>(static_cast<char*>(base) + offset(kTopkIdx)) +
               slot_index(channel, src, slot) * num_topk;
    }
    DEEP_EP_HD float* topk_weights(void* base, int channel, int src, int slot) const {
        return reinterpret_cast<float*>(static_cast<char*>(base) + offset(kTopkWeights)) +
               slot_index(channel, src, slot) * num_topk;
    }
    DEEP_EP_HD int* scales(void* base, int channel, int src, int slot) const {
        return reinterpret_cast<int*>(static_cast<char*>(base) + offset(kScales)) +
               slot_index(channel, src, slot) * num_scales;
    }
};

// The layout a dispatch uses (and its notify). E_loc > 0 reserves the notify metadata.
DEEP_EP_HD IntranodeLayout dispatch_layout(int num_ranks, int num_channels, int num_slots, int num_local_experts,
                                           int64_t row_bytes, int num_topk, int num_scales) {
    IntranodeLayout l;
    l.num_ranks = num_ranks;
    l.num_channels = num_channels;
    l.num_slots = num_slots;
    l.num_local_experts = num_local_experts;
    l.row_bytes = row_bytes;
    l.num_topk = num_topk;
    l.num_scales = num_scales;
    l.with_src_idx = true;
    l.with_topk_idx = num_topk > 0;
    l.finalize();
    return l;
}

// The layout a combine uses: rows of bf16 and, optionally, top-k weights.
DEEP_EP_HD IntranodeLayout combine_layout(int num_ranks, int num_channels, int num_slots, int64_t row_bytes,
                                          int num_topk) {
    IntranodeLayout l;
    l.num_ranks = num_ranks;
    l.num_channels = num_channels;
    l.num_slots = num_slots;
    l.num_local_experts = 0;
    l.row_bytes = row_bytes;
    l.num_topk = num_topk;
    l.num_scales = 0;
    l.with_src_idx = false;
    l.with_topk_idx = false;
    l.finalize();
    return l;
}

}  // namespace deep_ep

// The launchers the C ABI calls: raw pointers, sizes and a stream; outputs first in each params
// struct. One namespace per mode. Every launcher checks its launch with cudaGetLastError and throws
// deep_ep::Error on failure.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../deep_ep_internode.h"
#include "buffer_layout.cuh"
#include "peer.cuh"

namespace deep_ep {

namespace layout {

struct LayoutArgs {
    int* num_tokens_per_rank;     // out [R] int32
    int* num_tokens_per_expert;   // out [E] int32
    bool* is_token_in_rank;       // out [T, R] bool
    const int64_t* topk_idx;      // [T, K] int64, -1 = unused
    int num_tokens;
    int num_topk;
    int num_experts;
    int num_ranks;
};

void get_dispatch_layout(const LayoutArgs& args, cudaStream_t stream);

}  // namespace layout

namespace intranode {

// Count exchange before a non-cached dispatch (one block).
struct NotifyDispatchArgs {
    int* rank_prefix_matrix;           // out [R, R]: inclusive over source ranks, every column
    int* channel_prefix_matrix;        // out [R, C]: tokens of channels 0..c this rank sends to d
    int* recv_channel_prefix_matrix;   // out [R, C]: exclusive start of (src, c) in src's segment
    int* host_counters;                // device alias of the host-mapped counters (kNumHostCounters)
    const int* num_tokens_per_expert;  // [E]
    const bool* is_token_in_rank;      // [T, R]
    int num_tokens;
    int num_experts;
    int expert_alignment;
    int num_worst_tokens;              // 0: write the host counters; > 0: only flag an overflow
    IntranodeLayout buffer;            // layout of the dispatch that follows (sets R, C, E_loc)
    PeerBuffers peers;
    int rank;
    uint64_t timeout_ns;
};

void notify_dispatch(const NotifyDispatchArgs& args, cudaStream_t stream);

// Before a cached dispatch or a combine: zero this rank's ring counters for `buffer` between two
// barriers (one block).
struct CachedNotifyArgs {
    IntranodeLayout buffer;
    PeerBuffers peers;
    int rank;
    uint64_t timeout_ns;
};

void cached_notify(const CachedNotifyArgs& args, cudaStream_t stream);

struct DispatchArgs {
    int4* recv_x;                       // out [num_recv_rows, row_bytes]
    int* recv_x_scales;                 // out [num_recv_rows, S] (4-byte elements) or null
    int64_t* recv_topk_idx;             // out [num_recv_rows, K] or null
    float* recv_topk_weights;           // out [num_recv_rows, K] or null
    int* recv_src_idx;                  // out [num_recv_rows] or null (cached dispatch)
    int* send_head;                     // out [T, R] or null (cached dispatch)
    const int4* x;                      // [T, row_bytes]
    const int* x_scales;                // [T, S] 4-byte elements with the strides below, or null
    int64_t scale_token_stride;         // in elements
    int64_t scale_hidden_stride;        // in elements
    const int64_t* topk_idx;            // [T, K] or null
    const float* topk_weights;          // [T, K] or null
    const bool* is_token_in_rank;       // [T, R]
    const int* rank_prefix_matrix;      // [R, R] (from notify or the handle)
    const int* recv_channel_prefix_matrix;  // [R, C]
    int num_tokens;
    int num_recv_rows;                  // rows of the outputs; rows past the received count are
    bool fill_trailing_rows;            // zeroed (-1 for indices) when this is set (worst tokens)
    int num_local_experts;
    int num_max_send_tokens;            // tokens per chunk before the tail is published
    IntranodeLayout buffer;
    PeerBuffers peers;
    int rank;
    uint64_t timeout_ns;
};

void dispatch(const DispatchArgs& args, cudaStream_t stream);

struct CombineArgs {
    int4* combined_x;                   // out [T, hidden] bf16
    float* combined_topk_weights;       // out [T, K] or null
    const int4* x;                      // [num_recv_rows, hidden] bf16, rows as dispatch returned them
    const float* topk_weights;          // [num_recv_rows, K] or null
    const int4* bias_0;                 // [T, hidden] bf16 or null
    const int4* bias_1;                 // [T, hidden] bf16 or null
    const int* rank_prefix_matrix;      // [R, R]
    const int* recv_channel_prefix_matrix;  // [R, C]
    const int* send_head;               // [T, R]
    int num_tokens;
    int num_max_send_tokens;
    IntranodeLayout buffer;
    PeerBuffers peers;
    int rank;
    uint64_t timeout_ns;
};

void combine(const CombineArgs& args, cudaStream_t stream);

// Blocks of the dispatch / combine kernel that fit on one SM at once (the current device). The ring
// protocol needs every block of a rank resident together, so the runtime checks
// 2 * num_channels <= num_sms * this before launching.
int dispatch_max_blocks_per_sm();
int combine_max_blocks_per_sm();

}  // namespace intranode

namespace internode {

// The internode kernels of `call.op` over the peer-memory transport (every rank's RDMA region is
// mapped here: call.rdma_peers). internode.cu; the NVSHMEM instantiation is in libdeep_ep_nvshmem.so.
void launch_peer(const deep_ep_internode_call& call, cudaStream_t stream);

}  // namespace internode

}  // namespace deep_ep

/* The C ABI of the deep_ep core (libdeep_ep_core.so), the only surface Python sees.
 *
 * Plain C types only: device pointers as void*, streams (cudaStream_t) as uint64_t, sizes as int or
 * int64_t. Python reaches it through a pybind11 module compiled against this header only
 * (csrc/python/core_binding.cpp, opened by deep_ep/_core.py), so one build of the library serves every Python
 * and torch version; no torch or CPython header is included anywhere in csrc/.
 *
 * Conventions:
 *  - Functions return 0 on success and -1 on failure; deep_ep_core_last_error() then returns the
 *    message (thread-local, valid until the next failing call on this thread).
 *  - Kernels are enqueued on `stream` and are not waited for, except where a function says so.
 *  - `rt` is a runtime made by deep_ep_runtime_create (one per Buffer and rank).
 *  - Tensor arguments are contiguous unless a stride is passed; shapes are in the comments with
 *    R = ranks, C = channels, T = tokens of this rank, K = top-k, S = scale columns, E = experts.
 */
#ifndef DEEP_EP_CORE_H_
#define DEEP_EP_CORE_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define DEEP_EP_CORE_API __attribute__((visibility("default")))
#define DEEP_EP_CORE_ABI_VERSION 3

/* ---- library and device queries (safe without a GPU: they fail with a message) */
DEEP_EP_CORE_API int deep_ep_core_abi_version(void);
DEEP_EP_CORE_API int deep_ep_core_is_sm90(void);       /* 0 when built with DISABLE_SM90_FEATURES */
DEEP_EP_CORE_API int deep_ep_core_has_nvshmem(void);   /* 0: intranode-only build */
DEEP_EP_CORE_API const char* deep_ep_core_last_error(void);
/* limits[0..6] = max ranks per NVLink domain, max channels, max top-k, max local experts,
 * threads per dispatch/combine block, number of host counters, max nodes of the internode kernels. */
DEEP_EP_CORE_API int deep_ep_core_limits(int* limits, int num_limits);
DEEP_EP_CORE_API int deep_ep_core_device_count(int* count);
DEEP_EP_CORE_API int deep_ep_core_device_pci_bus_id(int device, char* bus_id, int length);
DEEP_EP_CORE_API int deep_ep_core_device_by_pci_bus_id(const char* bus_id, int* device);
DEEP_EP_CORE_API int deep_ep_core_can_access_peer(int device, int peer_device, int* can_access);

/* ---- runtime: the NVLink buffer, its peers, host-mapped counters */
/* Allocates num_nvl_bytes (+ barrier signals) with cudaMalloc on `device`, zeroed, and the
 * host-mapped counters. timeout_s bounds every device-side and host-side wait. */
DEEP_EP_CORE_API int deep_ep_runtime_create(int rank, int num_ranks, int device, int64_t num_nvl_bytes,
                                            double timeout_s, void** rt);
/* Waits for this device's work, closes IPC mappings, frees. Call only after every rank's kernels
 * that use this buffer have finished (Python runs a barrier first). */
DEEP_EP_CORE_API int deep_ep_runtime_destroy(void* rt);
DEEP_EP_CORE_API int deep_ep_runtime_ipc_handle(void* rt, void* handle_out, int handle_bytes); /* 64 bytes */
DEEP_EP_CORE_API int deep_ep_runtime_local_ptr(void* rt, uint64_t* ptr);  /* the NVLink data region */
/* handles: R * 64 bytes; ptrs: R raw pointers; same_process[i] != 0 when rank i lives in this process
 * (its raw pointer is used; an IPC handle cannot be opened by the process that made it). */
DEEP_EP_CORE_API int deep_ep_runtime_open_peers(void* rt, const void* handles, const uint64_t* ptrs,
                                                const int* same_process);
DEEP_EP_CORE_API int deep_ep_runtime_synchronize(void* rt);
/* Blocks (the binding releases the GIL) until the notify kernel wrote the received-token count and the
 * num_local_experts per-expert counts; values[0] = tokens, values[1 + j] = expert j. Returns 0 when
 * they arrived, 1 on timeout (values hold what was seen, -1 = not written), -1 on a CUDA error. */
DEEP_EP_CORE_API int deep_ep_runtime_wait_recv_counters(void* rt, uint64_t stream, int num_local_experts,
                                                        int* values);
/* The largest per-rank receive count of an earlier num_worst_tokens dispatch that overflowed, or 0;
 * clears it. */
DEEP_EP_CORE_API int deep_ep_runtime_take_worst_overflow(void* rt, int* value);

/* ---- kernels */
/* get_dispatch_layout on `device` (the stream's). topk_idx [T, K] int64; outputs int32 [R], int32 [E],
 * bool [T, R]. */
DEEP_EP_CORE_API int deep_ep_get_dispatch_layout(int device, uint64_t stream, void* num_tokens_per_rank,
                                                 void* num_tokens_per_expert, void* is_token_in_rank,
                                                 const void* topk_idx, int num_tokens, int num_topk,
                                                 int num_experts, int num_ranks);

/* Bytes of NVLink buffer a dispatch (is_combine = 0) or combine (1) needs; -1 on bad arguments. */
DEEP_EP_CORE_API int64_t deep_ep_intranode_buffer_bytes(int num_ranks, int num_channels, int num_slots,
                                                        int num_experts, int64_t row_bytes, int num_topk,
                                                        int num_scales, int is_combine);

/* Count exchange of a non-cached dispatch. Outputs int32 [R, R], [R, C], [R, C]; the tokens per
 * destination come from is_token_in_rank [T, R] (bool), the per-expert counts from
 * num_tokens_per_expert [E] (int32). With
 * num_worst_tokens == 0 the host-mapped counters are reset here and written by the kernel (wait with
 * deep_ep_runtime_wait_recv_counters). The layout arguments must equal the dispatch's. */
DEEP_EP_CORE_API int deep_ep_intranode_notify_dispatch(
    void* rt, uint64_t stream, void* rank_prefix_matrix, void* channel_prefix_matrix,
    void* recv_channel_prefix_matrix, const void* num_tokens_per_expert, const void* is_token_in_rank, int num_tokens, int num_experts, int num_channels, int num_slots,
    int64_t row_bytes, int num_topk, int num_scales, int expert_alignment, int num_worst_tokens);

/* Dispatch. cached != 0: a cached dispatch (no top-k, no recv_src_idx/send_head outputs; pass
 * num_experts = 0 and num_topk = 0); it runs its own ring reset first. Otherwise it follows
 * deep_ep_intranode_notify_dispatch with the same layout arguments. Outputs have num_recv_rows rows;
 * with fill_trailing_rows the rows past the received count are zeroed (-1 for indices). */
DEEP_EP_CORE_API int deep_ep_intranode_dispatch(
    void* rt, uint64_t stream, void* recv_x, void* recv_x_scales, void* recv_topk_idx, void* recv_topk_weights,
    void* recv_src_idx, void* send_head, const void* x, const void* x_scales, int64_t scale_token_stride,
    int64_t scale_hidden_stride, const void* topk_idx, const void* topk_weights, const void* is_token_in_rank,
    const void* rank_prefix_matrix, const void* recv_channel_prefix_matrix, int num_tokens, int num_recv_rows,
    int fill_trailing_rows, int num_experts, int num_channels, int num_slots, int num_max_send_tokens,
    int64_t row_bytes, int num_topk, int num_scales, int cached);

/* Combine (runs its ring reset first). x [N, hidden] bf16, topk_weights [N, K] or NULL, biases
 * [T, hidden] bf16 or NULL; outputs [T, hidden] bf16 and [T, K] float32 (or NULL). */
DEEP_EP_CORE_API int deep_ep_intranode_combine(
    void* rt, uint64_t stream, void* combined_x, void* combined_topk_weights, const void* x,
    const void* topk_weights, const void* bias_0, const void* bias_1, const void* rank_prefix_matrix,
    const void* recv_channel_prefix_matrix, const void* send_head, int num_tokens, int num_channels,
    int num_slots, int num_max_send_tokens, int64_t row_bytes, int num_topk);

/* ---- internode (two-hop) normal mode over the peer-memory transport (deep_ep_internode.h). The
 * runtime's allocation holds the NVL region [0, nvl_region_bytes) and the RDMA region after it; every
 * rank must map every other rank's allocation (one host). */
struct deep_ep_internode_call;
DEEP_EP_CORE_API int deep_ep_internode_call_bytes(void);  /* sizeof(deep_ep_internode_call) */
/* Bytes of RDMA and NVL region the call's layout needs (checks the call's shape). */
DEEP_EP_CORE_API int deep_ep_internode_layout_bytes(const struct deep_ep_internode_call* call, int64_t* rdma_bytes,
                                                    int64_t* nvl_bytes);
/* Enqueues the kernels of call->op. Fills the transport pointers, host counters and timeout from the
 * runtime. A non-cached notify with num_worst_tokens == 0 resets the host counters: wait for them
 * with deep_ep_runtime_wait_recv_counters, then read index kCounterRdmaRecvTokens (M). */
DEEP_EP_CORE_API int deep_ep_internode_launch(void* rt, const struct deep_ep_internode_call* call,
                                              int64_t nvl_region_bytes, uint64_t stream);
/* For the NVSHMEM internode path (libdeep_ep_nvshmem.so launches, this runtime maps the node's NVL
 * regions): peer `peer`'s mapped data region, the device alias of the host counters, and the counter
 * reset a non-cached notify needs before it runs. */
DEEP_EP_CORE_API int deep_ep_runtime_peer_ptr(void* rt, int peer, uint64_t* ptr);
DEEP_EP_CORE_API int deep_ep_runtime_device_counters(void* rt, uint64_t* ptr);
DEEP_EP_CORE_API int deep_ep_runtime_reset_recv_counters(void* rt, int num_local_experts);
/* One host-mapped counter as the CPU sees it now. */
DEEP_EP_CORE_API int deep_ep_runtime_host_counter(void* rt, int index, int* value);
/* Region offsets of the internode layout (InternodeLayout::RdmaRegion / NvlRegion order); returns the
 * message bytes. */
DEEP_EP_CORE_API int deep_ep_host_internode_layout(int num_ranks, int num_ranks_per_node, int num_channels,
                                                   int num_rdma_slots, int num_nvl_slots, int num_local_experts,
                                                   int64_t row_bytes, int num_topk, int num_scales, int is_combine,
                                                   int64_t* rdma_offsets, int num_rdma_offsets, int64_t* nvl_offsets,
                                                   int num_nvl_offsets);

/* ---- host-side index math, exported for CPU unit tests (same code the kernels run) */
DEEP_EP_CORE_API void deep_ep_host_channel_range(int num_tokens, int num_channels, int channel, int* begin, int* end);
DEEP_EP_CORE_API void deep_ep_host_recv_segment(const int* rank_prefix_matrix, const int* recv_channel_prefix_matrix,
                                                int num_ranks, int num_channels, int rank, int src, int channel,
                                                int* row_begin, int* count);
DEEP_EP_CORE_API int deep_ep_host_aligned_count(int count, int alignment);
DEEP_EP_CORE_API int deep_ep_host_ring_free_slots(int tail, int head, int capacity);
/* Region offsets of the NVLink buffer (IntranodeLayout::Region order, num_offsets <= 11); returns
 * the total bytes. */
DEEP_EP_CORE_API int64_t deep_ep_host_intranode_layout(int num_ranks, int num_channels, int num_slots,
                                                       int num_local_experts, int64_t row_bytes, int num_topk,
                                                       int num_scales, int is_combine, int64_t* offsets,
                                                       int num_offsets);
/* The launch check as every entry point runs it (clear the pending error on entry, launch, check),
 * replayed with `script[0..n)` standing in for successive cudaGetLastError results (cudaError_t
 * values; cudaSuccess after the script) and no real launch: returns 0, or -1 with the message in
 * deep_ep_core_last_error. For the CPU tests of the error reporting. */
DEEP_EP_CORE_API int deep_ep_core_host_replay_launch_check(const int* script, int n);

#ifdef __cplusplus
}
#endif

#endif /* DEEP_EP_CORE_H_ */

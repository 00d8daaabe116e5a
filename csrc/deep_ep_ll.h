/* The C ABI of the low-latency (LL) kernels, shared by the two libraries that carry them:
 *
 *   libdeep_ep_core.so     peer-memory transport (CUDA IPC pointers of a Runtime), always built;
 *   libdeep_ep_nvshmem.so  NVSHMEM transport (public device API), built only when NVSHMEM is found;
 *                          it needs libnvshmem_host.so.3, which Python loads first (deep_ep/_core.py).
 *
 * One call = one `deep_ep_ll_call` (plain C struct, bound field by field by the pybind11 module) plus the
 * phases to run. Every pointer is a device pointer unless marked "pinned host". Offsets are byte
 * offsets inside the LL buffer (the layout of deep_ep.config.LowLatencyLayout); the buffer's base is
 * this rank's local base, and for NVSHMEM it is a symmetric address.
 *
 * Phases: DEEP_EP_LL_SEND (prepare + put + signal), DEEP_EP_LL_RECV (wait + unpack / reduce), or both.
 * Kernels are enqueued on `stream` and never waited for; nothing synchronises with the CPU, so a call
 * can be captured in a CUDA graph (the slot is then fixed in the graph: capture a dispatch and its combine
 * together; docs/design.md).
 */
#ifndef DEEP_EP_LL_H_
#define DEEP_EP_LL_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define DEEP_EP_LL_API __attribute__((visibility("default")))

#define DEEP_EP_LL_DISPATCH 1
#define DEEP_EP_LL_COMBINE 2
#define DEEP_EP_LL_SEND 1
#define DEEP_EP_LL_RECV 2

/* Workspace int32 words per slot (device memory the engine owns, zeroed once):
 *   [0, E)                     pairs routed to each global expert by this rank (clamped to T_max)
 *   [E, E + T_max*K)           position of pair (t, k) in its expert's block (valid pairs only)
 *   [E + T_max*K, + E*T_max)   token of each (expert, position) (dispatch send list)
 *   [.., + E_loc*R)            received counts of the dispatch receiver (published by part 0)
 *   [.., + E_loc)              "counts published" word per local expert: cleared by every call's prepare,
 *                              set by part 0 of the dispatch receive (low_latency.cuh, begin_slot_call)
 * and, before the two slots, DEEP_EP_LL_WS_HEADER words: epoch[2]. deep_ep_ll_workspace_words gives the
 * total. */
#define DEEP_EP_LL_WS_HEADER 32

typedef struct deep_ep_ll_call {
    /* what */
    int32_t kind;          /* DEEP_EP_LL_DISPATCH / DEEP_EP_LL_COMBINE */
    int32_t rank, num_ranks, slot;
    int32_t num_tokens, num_max_tokens, hidden, num_experts, num_topk;
    int32_t use_fp8, round_scale, use_ue8m0, use_logfmt, zero_copy, shrink;
    int32_t num_sms;        /* SMs of the device (sizes the grids) */
    int32_t device;         /* CUDA device of the buffer and the stream: every entry point makes it current */
    uint64_t timeout_ns;
    /* LL buffer: local base (symmetric for NVSHMEM) and the layout offsets of both slots */
    void* buffer;
    int64_t signaling_offset[2], send_offset[2], recv_offset[2];
    int64_t dispatch_msg_bytes, combine_msg_bytes;
    /* engine state */
    int32_t* workspace;     /* deep_ep_ll_workspace_words int32, zeroed at creation */
    int32_t* mask;          /* [R] int32, 1 = masked (shrink mode); always valid */
    int32_t* host_flags;    /* pinned host, [4]: [0] largest overflowing block (sticky), [1] timeouts masked */
    /* inputs */
    const void* x;            /* dispatch: [T, H] bf16; combine: [E_loc, R*T_max, H] bf16 (ignored with zero_copy) */
    const int64_t* topk_idx;  /* [T, K] */
    const float* topk_weights;/* combine: [T, K] */
    /* dispatch outputs */
    void* recv_x;             /* [E_loc, R*T_max, H] bf16 or fp8 */
    void* recv_scales;        /* fp8: [E_loc, S, N] float32 or [E_loc, ceil(S/4), N] int32 storage (column-major) */
    int32_t* recv_count;      /* [E_loc] */
    int32_t* src_info;        /* [E_loc, N] */
    int64_t* layout_range;    /* [E_loc, R] (combine: input) */
    int32_t* cumulative_stats;/* [E_loc] or NULL */
    int64_t* wait_stats;      /* [R] or NULL (dispatch or combine wait ns) */
    /* combine output */
    void* combined_x;         /* [T, H] bf16 */
} deep_ep_ll_call;

/* ---- in libdeep_ep_core.so (errors: deep_ep_core_last_error) */
/* sizeof(deep_ep_ll_call), checked by the pybind11 module against its own. */
DEEP_EP_LL_API int deep_ep_ll_call_bytes(void);
/* Total int32 words of the workspace for (T_max, E, R) (top-k is fixed at 16 in it). */
DEEP_EP_LL_API int64_t deep_ep_ll_workspace_words(int num_max_tokens, int num_experts, int num_ranks);
/* The LL buffer layout (deep_ep.config.LowLatencyLayout): out[0..8] = signaling offset of slot 0, 1,
 * send offset 0, 1, recv offset 0, 1, total bytes, dispatch message bytes, combine message bytes.
 * Returns 0, or -1 on bad arguments. */
DEEP_EP_LL_API int deep_ep_ll_layout(int num_max_tokens, int hidden, int num_experts, int64_t* out, int num_out);
/* Host replays of the kernels' per-call workspace bookkeeping (the same functions), for CPU tests, on a
 * host copy of the workspace: begin_slot = what the prepare kernel does to the slot's words (epoch bump,
 * ready words cleared); publish_counts = what part 0 of the dispatch receive stores once the counts of
 * `local_expert` are written; counts_published = 1 when the receive's other blocks would stop waiting (0 when
 * they would wait, -1 on a null argument). */
DEEP_EP_LL_API int deep_ep_ll_host_begin_slot(int32_t* workspace, const deep_ep_ll_call* call);
DEEP_EP_LL_API int deep_ep_ll_host_publish_counts(int32_t* workspace, const deep_ep_ll_call* call, int local_expert);
DEEP_EP_LL_API int deep_ep_ll_host_counts_published(const int32_t* workspace, const deep_ep_ll_call* call,
                                                    int local_expert);
/* Signal word of (epoch, count) and the epoch after `epoch` (host copies of the device math). */
DEEP_EP_LL_API int deep_ep_ll_host_pack_signal(int epoch, int count);
DEEP_EP_LL_API int deep_ep_ll_host_next_epoch(int epoch);
/* Host runs of the kernels' scalar quantisation math (the same __host__ __device__ functions), for CPU
 * tests: n bf16 values (bits), n % 128 == 0. FP8: out[n] e4m3 bytes and scales[n / 128] float32.
 * LogFMT-10: out[n] bf16 bits, each 128-group rounded as the combine send does. */
DEEP_EP_LL_API void deep_ep_ll_host_fp8_cast(const uint16_t* x, int n, int round_scale, uint8_t* out, float* scales);
DEEP_EP_LL_API void deep_ep_ll_host_logfmt10_round(const uint16_t* x, int n, uint16_t* out);
/* Enqueue the prepare kernel (epoch bump, per-expert lists, dispatch cast): first half of a send. */
DEEP_EP_LL_API int deep_ep_ll_prepare(const deep_ep_ll_call* call, uint64_t stream);
/* Enqueue the send kernel over the peer-memory transport of `rt` (a runtime whose data region is the
 * LL buffer, made with deep_ep_runtime_create(num_nvl_bytes = the LL buffer size) + open_peers). */
DEEP_EP_LL_API int deep_ep_ll_peer_send(void* rt, const deep_ep_ll_call* call, uint64_t stream);
/* Enqueue the receive kernel (any transport: it reads this rank's memory only). */
DEEP_EP_LL_API int deep_ep_ll_receive(const deep_ep_ll_call* call, uint64_t stream);

/* ---- in libdeep_ep_nvshmem.so (errors: deep_ep_nvshmem_last_error) */
DEEP_EP_LL_API int deep_ep_nvshmem_abi_version(void);
DEEP_EP_LL_API const char* deep_ep_nvshmem_last_error(void);
DEEP_EP_LL_API int deep_ep_nvshmem_call_bytes(void);
DEEP_EP_LL_API int deep_ep_nvshmem_uniqueid_bytes(void);
/* Rank 0 of the group: a fresh unique id (uniqueid_bytes bytes) for the UID bootstrap. */
DEEP_EP_LL_API int deep_ep_nvshmem_get_uniqueid(void* out);
/* nvshmemx_init_attr(NVSHMEMX_INIT_WITH_UNIQUEID) with (rank, num_ranks) on `device` (made current).
 * A second call in the same process with the same (rank, num_ranks) joins the existing world (the
 * unique id is then ignored); deep_ep_nvshmem_finalize finalizes with the last user. */
DEEP_EP_LL_API int deep_ep_nvshmem_init(const void* uniqueid, int rank, int num_ranks, int device);
/* nvshmem_align(128, bytes), zeroed, then a barrier of all PEs. */
DEEP_EP_LL_API int deep_ep_nvshmem_alloc(int64_t bytes, uint64_t* ptr);
DEEP_EP_LL_API int deep_ep_nvshmem_free(uint64_t ptr);
DEEP_EP_LL_API int deep_ep_nvshmem_barrier(void);
DEEP_EP_LL_API int deep_ep_nvshmem_finalize(void);
/* nvshmemx_init_status(), nvshmem_my_pe(), nvshmem_n_pes(). */
DEEP_EP_LL_API int deep_ep_nvshmem_info(int* status, int* my_pe, int* n_pes);
/* Enqueue the send kernel over the NVSHMEM transport (call->buffer is the symmetric LL buffer). */
DEEP_EP_LL_API int deep_ep_nvshmem_ll_send(const deep_ep_ll_call* call, uint64_t stream);
/* The internode (two-hop) normal-mode kernels with the RDMA hop over NVSHMEM; `call` points to a
 * deep_ep_internode_call (csrc/deep_ep_internode.h) whose rdma_local, nvl_peers, host_counters and
 * timeout_ns the caller filled. */
DEEP_EP_LL_API int deep_ep_nvshmem_internode_launch(const void* call, uint64_t stream);
/* sizeof(deep_ep_internode_call) as this library was built (checked against the core's and Python's). */
DEEP_EP_LL_API int deep_ep_nvshmem_internode_call_bytes(void);

#ifdef __cplusplus
}
#endif

#endif /* DEEP_EP_LL_H_ */

/* The internode (two-hop) normal-mode call, shared by libdeep_ep_core.so (peer-memory transport: every
 * rank maps every other rank's buffer, i.e. "virtual nodes" on one host) and libdeep_ep_nvshmem.so
 * (NVSHMEM transport for the RDMA hop). One plain C struct describes every kernel of the mode, so
 * both libraries take the same argument and Python fills it once (deep_ep/engines/cuda_internode.py).
 *
 * Routing (docs/semantics.md, "Handle, several nodes"): rank r = (node n, local index l), P ranks per
 * node, NN = R / P nodes. A token of rank (a, i) that needs ranks of node b goes once over "RDMA" to
 * rank (b, i), the forwarder, which copies it over NVLink into the rings of the ranks (b, j) that
 * need it. Combine goes back the same way: (b, j) -> (b, i) over NVLink, where the rows are summed
 * per node, then one partial per token and node over RDMA to (a, i), which adds the nodes.
 *
 * Buffers: the RDMA region (the transport's buffer: count exchange, barrier words, RDMA rings) and
 * the NVL region (rings between the ranks of one node, reached with plain loads/stores). Layout:
 * csrc/kernels/internode_layout.cuh.
 */
#ifndef DEEP_EP_INTERNODE_H_
#define DEEP_EP_INTERNODE_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define DEEP_EP_INTERNODE_MAX_PEERS 8  /* per-process pointer tables: ranks of a node / of a peer world */

enum deep_ep_internode_op {
    DEEP_EP_INTERNODE_NOTIFY = 0,        /* count exchange + handle prefix matrices (non-cached dispatch) */
    DEEP_EP_INTERNODE_DISPATCH = 1,      /* dispatch (cached != 0: cached dispatch, runs its own ring reset) */
    DEEP_EP_INTERNODE_COMBINE = 2,       /* combine (runs its own ring reset first) */
};

/* Shapes: R ranks, P = num_ranks_per_node, NN = R / P, C channels, T tokens of this rank, K top-k,
 * S scale columns (4-byte elements), M = tokens this rank forwards (recv_rdma_rank_prefix_sum[-1]),
 * N = rows of the dispatch outputs. int32 unless stated. */
typedef struct deep_ep_internode_call {
    int op;
    int rank, num_ranks, num_ranks_per_node, num_channels;
    int num_rdma_slots, num_nvl_slots;           /* ring capacities (Config.*_chunked_recv_tokens) */
    int num_max_rdma_send, num_max_nvl_send;     /* chunk sizes (Config.*_chunked_send_tokens) */
    int num_tokens, num_experts, num_topk, num_scales;
    int64_t row_bytes;                           /* hidden * element size, multiple of 16 */
    int expert_alignment, num_worst_tokens;
    int num_recv_rows;                           /* N */
    int fill_trailing_rows;                      /* zero rows past the received count (worst tokens, cached) */
    int cached;
    int device;                                  /* the CUDA device of the stream (set current for the launch) */
    int nvshmem_p2p_group;                       /* NVSHMEM: 0 = load/store to every PE nvshmem_ptr reaches;
                                                  * G > 0 = only to PEs of the same group of G ranks (the node),
                                                  * others through NVSHMEM puts: a test knob that runs the
                                                  * network code path on one GPU */
    uint64_t timeout_ns;
    int* host_counters;                          /* device alias of the host-mapped counters */

    /* transport pointers, filled by the library that launches (Python leaves them zero) */
    void* rdma_local;                            /* this rank's RDMA region */
    void* rdma_peers[DEEP_EP_INTERNODE_MAX_PEERS];  /* peer transport: every rank's RDMA region */
    void* nvl_peers[DEEP_EP_INTERNODE_MAX_PEERS];   /* NVL region of local rank j of this node */

    /* ---- inputs */
    const void* x;                               /* dispatch [T, row_bytes]; combine [N, hidden] bf16 */
    const void* x_scales;                        /* [T, S] with the strides below, or NULL */
    int64_t scale_token_stride, scale_hidden_stride;
    const int64_t* topk_idx;                     /* [T, K] or NULL */
    const float* topk_weights;                   /* dispatch [T, K]; combine [N, K]; or NULL */
    const uint8_t* is_token_in_rank;             /* [T, R] bool */
    const int* num_tokens_per_expert;            /* [E] (notify) */
    const void* bias_0;                          /* combine [T, hidden] bf16 or NULL */
    const void* bias_1;

    /* ---- the handle (outputs of notify, inputs of dispatch and combine) */
    int* rdma_channel_prefix_matrix;             /* [NN, C] */
    int* gbl_channel_prefix_matrix;              /* [R, C] */
    int* recv_rdma_channel_prefix_matrix;        /* [NN, C] */
    int* recv_rdma_rank_prefix_sum;              /* [NN] */
    int* recv_gbl_channel_prefix_matrix;         /* [R, C] */
    int* recv_gbl_rank_prefix_sum;               /* [R] */
    uint8_t* recv_src_meta;                      /* [N, 8]: dispatch output */
    int* send_rdma_head;                         /* [T, NN]: dispatch output, combine input */
    int* send_nvl_head;                          /* [M_rows, P]: dispatch output, combine input */
    int send_nvl_head_rows;                      /* M_rows >= M (rows past M are -1) */

    /* ---- outputs */
    void* recv_x;                                /* dispatch [N, row_bytes]; combine [T, hidden] bf16 */
    void* recv_x_scales;                         /* [N, S] or NULL */
    int64_t* recv_topk_idx;                      /* [N, K] or NULL */
    float* recv_topk_weights;                    /* dispatch [N, K]; combine [T, K]; or NULL */
    int* recv_src_idx;                           /* [N] or NULL */
} deep_ep_internode_call;

#ifdef __cplusplus
}
#endif

#endif /* DEEP_EP_INTERNODE_H_ */

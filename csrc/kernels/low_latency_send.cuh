// The sending halves of the LL dispatch and combine, templates on the transport (transport.cuh).
// Instantiated for PeerTransport in low_latency.cu (libdeep_ep_core.so) and for NvshmemTransport in
// csrc/nvshmem/ll_nvshmem.cu (libdeep_ep_nvshmem.so). See low_latency.cuh for the protocol.
#pragma once

#include "exception.cuh"
#include "low_latency.cuh"

namespace deep_ep {
namespace ll {

// Block per global expert e: the tokens of this rank's pairs with e, in position order, go to
// [e_local][rank][position] of e's rank; then the (e_local, rank) signal word. Masked destinations
// (shrink mode) get nothing; a masked rank sends nothing.
template <typename Transport>
__global__ void __launch_bounds__(kThreads) dispatch_send_kernel(const __grid_constant__ deep_ep_ll_call c, const __grid_constant__ Transport tr) {
    const int e = blockIdx.x;
    const int num_local = c.num_experts / c.num_ranks;
    const int dst = e / num_local, j = e % num_local;
    if (rank_masked(c, c.rank) || rank_masked(c, dst)) return;
    const Workspace ws(c.num_max_tokens, c.num_experts, c.num_ranks);
    const int epoch = c.workspace[c.slot];
    const int total = c.workspace[ws.expert_count(c.slot) + e];  // may exceed T_max (overflow, flagged)
    const int count = min(total, c.num_max_tokens);
    const int* list = c.workspace + ws.token_list(c.slot) + static_cast<int64_t>(e) * c.num_max_tokens;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int64_t put_bytes = dispatch_put_bytes(c.hidden, c.use_fp8 != 0);
    const char* send = tr.local(c.send_offset[c.slot]);
    const int64_t block_row = (static_cast<int64_t>(j) * c.num_ranks + c.rank) * c.num_max_tokens;
    for (int pos = warp; pos < count; pos += kWarps) {
        const int t = list[pos];
        tr.put_warp(dst, c.recv_offset[c.slot] + (block_row + pos) * c.dispatch_msg_bytes,
                    send + static_cast<int64_t>(t) * c.dispatch_msg_bytes, put_bytes, lane);
    }
    tr.complete_warp(lane);
    __syncthreads();
    if (threadIdx.x == 0) {
        tr.signal_set(dst, c.signaling_offset[c.slot] + 4 * (static_cast<int64_t>(j) * c.num_ranks + c.rank),
                      pack_signal(epoch, total));
    }
}

// 16 bytes (8 bf16) number q of a row that may be only 4-byte aligned: the zero-copy view's rows are
// M = H + 2*(H/128) bf16 apart (docs/semantics.md), which is a multiple of 16 bytes only when
// H % 512 == 0. `nc`: the row is a kernel input nobody writes meanwhile (user x).
__device__ __forceinline__ int4 load_row16(const char* row, int64_t q, bool aligned, bool nc) {
    if (aligned) {
        const int4* p = reinterpret_cast<const int4*>(row) + q;
        return nc ? ptx::ld_nc_global_v4(p) : ptx::ld_na_global_v4(p);
    }
    const int* p = reinterpret_cast<const int*>(row) + 4 * q;
    return make_int4(ptx::ld_na_global(p), ptx::ld_na_global(p + 1), ptx::ld_na_global(p + 2), ptx::ld_na_global(p + 3));
}

__device__ __forceinline__ void store_row16(char* row, int64_t q, int4 v, bool aligned) {
    if (aligned) {
        reinterpret_cast<int4*>(row)[q] = v;
    } else {
        int* p = reinterpret_cast<int*>(row) + 4 * q;
        p[0] = v.x, p[1] = v.y, p[2] = v.z, p[3] = v.w;
    }
}

// Block per (local expert j, source s): rows [begin, begin + count) of expert j (layout_range of the
// dispatch) go back to s, into s's [global expert][position] slots (2H bytes apart), LogFMT-rounded on
// the way if asked; then s's signal word of the global expert. Peers that are load/store reachable get
// the rows stored directly; others get them staged in this rank's send area (the zero-copy view, rows
// combine_msg_bytes apart) and put from there.
template <typename Transport>
__global__ void __launch_bounds__(kThreads, 1) combine_send_kernel(const __grid_constant__ deep_ep_ll_call c, const __grid_constant__ Transport tr) {
    const int s = blockIdx.x % c.num_ranks, j = blockIdx.x / c.num_ranks;
    if (rank_masked(c, c.rank) || rank_masked(c, s)) return;
    const int num_local = c.num_experts / c.num_ranks;
    const int64_t num_rows = static_cast<int64_t>(c.num_ranks) * c.num_max_tokens;
    const int epoch = c.workspace[c.slot];
    const int64_t range = c.layout_range[static_cast<int64_t>(j) * c.num_ranks + s];
    const int64_t begin = range >> 32;
    const int count = static_cast<int>(range & 0xffffffff);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int64_t row_bytes = 2 * static_cast<int64_t>(c.hidden);  // also the receive-slot stride
    const int64_t num_int4 = row_bytes / 16;                         // a multiple of 16 (hidden % 128 == 0)
    const bool staged_aligned = c.combine_msg_bytes % 16 == 0;
    const int global_expert = c.rank * num_local + j;
    char* send_area = tr.local(c.send_offset[c.slot]);
    for (int i = warp; i < count; i += kWarps) {
        const int64_t row = static_cast<int64_t>(j) * num_rows + begin + i;
        char* staged = send_area + row * c.combine_msg_bytes;
        const char* src = c.zero_copy ? staged : static_cast<const char*>(c.x) + row * row_bytes;
        const bool src_aligned = c.zero_copy ? staged_aligned : true;
        const int64_t dst_offset =
            c.recv_offset[c.slot] + (static_cast<int64_t>(global_expert) * c.num_max_tokens + i) * row_bytes;
        char* direct = tr.peer_ptr(s, dst_offset);
        const bool transform = c.use_logfmt || !c.zero_copy;  // the row must be (re)written somewhere
        if (direct != nullptr || transform) {
            char* dst = direct != nullptr ? direct : staged;
            const bool dst_aligned = direct != nullptr || staged_aligned;
            // Iterations are warp-uniform: LogFMT groups are 16 lanes and num_int4 % 16 == 0.
            for (int64_t base = 0; base < num_int4; base += 32) {
                const int64_t q = base + lane;
                const bool active = q < num_int4;
                int4 v = make_int4(0, 0, 0, 0);
                if (active) v = load_row16(src, q, src_aligned, !c.zero_copy);
                if (c.use_logfmt) v = logfmt10_round_half(v);
                if (active) store_row16(dst, q, v, dst_aligned);
            }
        }
        if (direct == nullptr) {  // only NVSHMEM peers without a load/store path (any source alignment)
            __syncwarp();
            tr.put_warp(s, dst_offset, staged, row_bytes, lane);
        }
    }
    tr.complete_warp(lane);
    __syncthreads();
    if (threadIdx.x == 0) tr.signal_set(s, c.signaling_offset[c.slot] + 4 * static_cast<int64_t>(global_expert), pack_signal(epoch, 0));
}

// Host launcher of the send kernel of `c.kind` (prepare must have been enqueued before).
template <typename Transport>
void launch_send(const deep_ep_ll_call& c, const Transport& tr, cudaStream_t stream) {
    check_call(c);
    if (c.kind == DEEP_EP_LL_DISPATCH) {
        DEEP_EP_LAUNCH(dispatch_send_kernel<Transport>, c.num_experts, kThreads, 0, stream, c, tr);
    } else {
        DEEP_EP_LAUNCH(combine_send_kernel<Transport>, c.num_experts, kThreads, 0, stream, c, tr);  // E_loc * R blocks
    }
    DEEP_EP_CHECK_LAUNCH("low_latency send");
}

}  // namespace ll
}  // namespace deep_ep

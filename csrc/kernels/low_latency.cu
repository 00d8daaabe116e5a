// LL kernels that need no transport (prepare, dispatch receive, combine receive: they touch this
// rank's own memory only) and the peer-memory instantiation of the send kernels. Protocol and
// layout: low_latency.cuh.
#include <string>

#include "exception.cuh"
#include "low_latency.cuh"
#include "low_latency_send.cuh"
#include "transport_peer.cuh"

namespace deep_ep {
namespace ll {

namespace {

__device__ __forceinline__ void store_host_flag(int* flags, int index, int value) {
    *reinterpret_cast<volatile int*>(flags + index) = value;
}

// Cast (or copy) token t into the send area: [int32 t, 0, 0, 0 | payload]. FP8: the recipe of
// docs/semantics.md (fp32 amax floored at 1e-4, IEEE divide, exact power-of-two rounding from the bits,
// IEEE reciprocal, multiply, clamp, RNE cast), one half-warp per 128-channel block.
__device__ __forceinline__ void cast_token(const deep_ep_ll_call& c, int t) {
    char* msg = static_cast<char*>(c.buffer) + c.send_offset[c.slot] + static_cast<int64_t>(t) * c.dispatch_msg_bytes;
    if (threadIdx.x == 0) *reinterpret_cast<int4*>(msg) = make_int4(t, 0, 0, 0);
    const int4* x = reinterpret_cast<const int4*>(static_cast<const __nv_bfloat16*>(c.x) + static_cast<int64_t>(t) * c.hidden);
    const int num_groups = c.hidden / kGroup;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, half = lane / 16, l16 = lane % 16;
    char* payload = msg + 16;
    for (int g0 = warp * 2; g0 < num_groups; g0 += kWarps * 2) {  // warp-uniform bounds
        const int g = g0 + half;
        const bool active = g < num_groups;
        int4 v = make_int4(0, 0, 0, 0);
        if (active) v = ptx::ld_nc_global_v4(x + g * 16 + l16);
        if (!c.use_fp8) {
            if (active) reinterpret_cast<int4*>(payload)[g * 16 + l16] = v;
            continue;
        }
        uint16_t h[8];
        memcpy(h, &v, sizeof(h));  // no pointer pun (defined behaviour in C++)
        float f[8];
        float amax = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            f[i] = bf16_bits_to_float(h[i]);
            amax = fmaxf(amax, fabsf(f[i]));
        }
#pragma unroll
        for (int m = 8; m >= 1; m >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, m));
        const float scale_inv = fp8_scale_inv(amax, c.round_scale != 0);
        const float inv = __frcp_rn(scale_inv);
        uint32_t packed[2] = {0u, 0u};
#pragma unroll
        for (int i = 0; i < 8; ++i) packed[i / 4] |= static_cast<uint32_t>(fp8_quantize(f[i], inv)) << (8 * (i % 4));
        if (active) {
            *reinterpret_cast<uint2*>(payload + g * kGroup + l16 * 8) = make_uint2(packed[0], packed[1]);
            if (l16 == 0) reinterpret_cast<float*>(payload + c.hidden)[g] = scale_inv;
        }
    }
}

// Grid: [cast blocks: one per token (dispatch only)] [list blocks: one warp per global expert].
__global__ void __launch_bounds__(kThreads) prepare_kernel(const __grid_constant__ deep_ep_ll_call c, int num_cast_blocks) {
    const Workspace ws(c.num_max_tokens, c.num_experts, c.num_ranks);
    if (blockIdx.x == 0) begin_slot_call(c.workspace, ws, c.slot, threadIdx.x, kThreads);
    if (static_cast<int>(blockIdx.x) < num_cast_blocks) {
        cast_token(c, blockIdx.x);
        return;
    }
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int e = (blockIdx.x - num_cast_blocks) * kWarps + warp;
    if (e >= c.num_experts) return;
    const int num_local = c.num_experts / c.num_ranks;
    int* count = c.workspace + ws.expert_count(c.slot);
    if (rank_masked(c, c.rank) || rank_masked(c, e / num_local)) {
        if (lane == 0) count[e] = 0;
        return;
    }
    int* pair_pos = c.workspace + ws.pair_pos(c.slot);
    int* list = c.workspace + ws.token_list(c.slot) + static_cast<int64_t>(e) * c.num_max_tokens;
    const int n = c.num_tokens * c.num_topk;
    int base = 0;
    for (int i0 = 0; i0 < n; i0 += 32) {
        const int i = i0 + lane;
        const bool match = i < n && c.topk_idx[i] == e;
        const unsigned ballot = __ballot_sync(0xffffffffu, match);
        if (match) {
            const int pos = base + __popc(ballot & ((1u << lane) - 1u));
            pair_pos[i] = pos;
            if (pos < c.num_max_tokens) list[pos] = i / c.num_topk;
        }
        base += __popc(ballot);
    }
    if (lane == 0) {
        // The true count (capped to what a signal word holds): the send kernel sends at most T_max rows,
        // and the receiver of an over-full block flags it too, so every rank involved raises.
        count[e] = min(base, kMaxSignalCount);
        if (base > c.num_max_tokens) store_host_flag(c.host_flags, 0, base);  // raised by Python on the next call
    }
}

// Grid: num_local * parts blocks, block b = (part b / E_loc, local expert b % E_loc). Part 0 waits for
// the R signals, publishes the counts and writes the per-expert outputs; every part unpacks rows.
__global__ void __launch_bounds__(kThreads, 1) dispatch_recv_kernel(const __grid_constant__ deep_ep_ll_call c, int parts) {
    __shared__ int s_count[kMaxRanks];
    __shared__ int s_begin[kMaxRanks];
    __shared__ int s_total;
    const int R = c.num_ranks;
    const int num_local = c.num_experts / R;
    const int j = blockIdx.x % num_local, part = blockIdx.x / num_local;
    const Workspace ws(c.num_max_tokens, c.num_experts, R);
    const int epoch = c.workspace[c.slot];
    int* counts = c.workspace + ws.recv_counts(c.slot) + static_cast<int64_t>(j) * R;
    int* ready = c.workspace + ws.ready(c.slot) + j;
    const char* local = static_cast<const char*>(c.buffer);
    const int* signals = reinterpret_cast<const int*>(local + c.signaling_offset[c.slot]) + static_cast<int64_t>(j) * R;
    const bool cut = rank_masked(c, c.rank);

    if (part == 0) {
        for (int s = threadIdx.x; s < R; s += kThreads) {
            int cnt = 0;
            if (!cut && !rank_masked(c, s)) {
                uint64_t waited = 0;
                const int value = wait_signal(signals + s, epoch, c.timeout_ns, &waited);
                if (value < 0) {
                    if (!c.shrink) ll_timeout_trap("low_latency_dispatch", "receive: waiting for the source's count", c.rank,
                                                   c.rank * num_local + j, s, epoch, ptx::ld_acquire_sys_global(signals + s));
                    atomicExch(c.mask + s, 1);  // shrink mode: a silent rank is masked, not waited for
                    store_host_flag(c.host_flags, 1, 1);
                } else {
                    cnt = signal_count(value);
                    if (cnt > c.num_max_tokens) {  // the source's block overflowed: it sent T_max rows
                        store_host_flag(c.host_flags, 0, cnt);
                        cnt = c.num_max_tokens;
                    }
                }
                if (c.wait_stats != nullptr && cnt > 0)
                    atomicAdd(reinterpret_cast<unsigned long long*>(c.wait_stats + s), static_cast<unsigned long long>(waited));
            }
            s_count[s] = cnt;
            counts[s] = cnt;
        }
    } else {
        if (threadIdx.x == 0) {
            SpinWait wait(c.timeout_ns);
            while (!counts_published(ptx::ld_acquire_sys_global(ready), epoch)) {
                if (wait.expired()) {
                    printf("deep_ep timeout in low_latency_dispatch (receive: block %d waiting for part 0 of local expert %d), "
                           "rank %d\n", static_cast<int>(blockIdx.x), j, c.rank);
                    __trap();
                }
            }
        }
        __syncthreads();
        for (int s = threadIdx.x; s < R; s += kThreads) s_count[s] = ptx::ld_relaxed_sys_global(counts + s);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        int running = 0;
        for (int s = 0; s < R; ++s) {
            s_begin[s] = running;
            running += s_count[s];
        }
        s_total = running;
        if (part == 0) {
            c.recv_count[j] = running;
            if (c.cumulative_stats != nullptr) c.cumulative_stats[j] += running;
        }
    }
    __syncthreads();
    if (part == 0) {
        for (int s = threadIdx.x; s < R; s += kThreads)
            c.layout_range[static_cast<int64_t>(j) * R + s] = (static_cast<int64_t>(s_begin[s]) << 32) | s_count[s];
        if (parts > 1) {
            __syncthreads();  // counts[] written by every thread above
            if (threadIdx.x == 0) {
                __threadfence();
                ptx::st_release_sys_global(ready, ready_value(epoch));
            }
        }
    }

    const int64_t num_rows = static_cast<int64_t>(R) * c.num_max_tokens;
    const int total = s_total;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int num_groups = c.hidden / kGroup;
    const int64_t payload_int4 = c.use_fp8 ? c.hidden / 16 : c.hidden / 8;
    for (int64_t r = part * kWarps + warp; r < num_rows; r += static_cast<int64_t>(parts) * kWarps) {
        const int64_t out_row = static_cast<int64_t>(j) * num_rows + r;
        if (r >= total) {
            if (lane == 0) c.src_info[out_row] = -1;
            continue;
        }
        int lo = 0, hi = R - 1;  // the source whose block holds row r (blocks are contiguous, ascending)
        while (lo < hi) {
            const int mid = (lo + hi + 1) / 2;
            if (s_begin[mid] <= r) lo = mid; else hi = mid - 1;
        }
        const int64_t i = r - s_begin[lo];
        const char* msg = local + c.recv_offset[c.slot] +
                          ((static_cast<int64_t>(j) * R + lo) * c.num_max_tokens + i) * c.dispatch_msg_bytes;
        if (lane == 0) c.src_info[out_row] = ptx::ld_na_global(reinterpret_cast<const int*>(msg));
        const int4* src = reinterpret_cast<const int4*>(msg + 16);
        int4* dst = reinterpret_cast<int4*>(static_cast<char*>(c.recv_x) + out_row * payload_int4 * 16);
        for (int64_t q = lane; q < payload_int4; q += 32) dst[q] = ptx::ld_na_global_v4(src + q);
        if (c.use_fp8) {
            const int* scales = reinterpret_cast<const int*>(msg + 16 + c.hidden);
            if (c.use_ue8m0) {
                const int num_packed = (num_groups + 3) / 4;
                int* out = static_cast<int*>(c.recv_scales);
                for (int q = lane; q < num_packed; q += 32) {
                    uint32_t word = 0;
                    for (int b = 0; b < 4 && 4 * q + b < num_groups; ++b)
                        word |= ((static_cast<uint32_t>(ptx::ld_na_global(scales + 4 * q + b)) >> 23) & 0xffu) << (8 * b);
                    out[(static_cast<int64_t>(j) * num_packed + q) * num_rows + r] = static_cast<int>(word);
                }
            } else {
                int* out = static_cast<int*>(c.recv_scales);  // float32 bits
                for (int g = lane; g < num_groups; g += 32)
                    out[(static_cast<int64_t>(j) * num_groups + g) * num_rows + r] = ptx::ld_na_global(scales + g);
            }
        }
    }
}

// Grid: one block per token (+ one block for the wait statistics). Reduces in k order:
// acc = +0; acc = acc + w_k * y_k (separately rounded multiply and add), then bf16.
__global__ void __launch_bounds__(kThreads) combine_recv_kernel(const __grid_constant__ deep_ep_ll_call c) {
    const int R = c.num_ranks;
    const int num_local = c.num_experts / R;
    const Workspace ws(c.num_max_tokens, c.num_experts, R);
    const int epoch = c.workspace[c.slot];
    const char* local = static_cast<const char*>(c.buffer);
    const int* signals = reinterpret_cast<const int*>(local + c.signaling_offset[c.slot]);
    const int* count = c.workspace + ws.expert_count(c.slot);
    const bool cut = rank_masked(c, c.rank);

    if (static_cast<int>(blockIdx.x) == c.num_tokens) {  // statistics block
        __shared__ unsigned long long s_ns[kMaxRanks];
        __shared__ int s_has[kMaxRanks];
        for (int d = threadIdx.x; d < R; d += kThreads) s_ns[d] = 0, s_has[d] = 0;
        __syncthreads();
        for (int e = threadIdx.x; e < c.num_experts; e += kThreads) {
            const int owner = e / num_local;
            if (cut || count[e] == 0 || rank_masked(c, owner)) continue;
            uint64_t waited = 0;
            if (wait_signal(signals + e, epoch, c.timeout_ns, &waited) < 0 && !c.shrink)
                ll_timeout_trap("low_latency_combine", "receive statistics", c.rank, e, owner, epoch, signals[e]);
            atomicMax(&s_ns[owner], static_cast<unsigned long long>(waited));
            s_has[owner] = 1;
        }
        __syncthreads();
        for (int d = threadIdx.x; d < R; d += kThreads)
            if (s_has[d]) atomicAdd(reinterpret_cast<unsigned long long*>(c.wait_stats + d), s_ns[d]);
        return;
    }

    __shared__ int64_t s_offset[kMaxTopK];
    __shared__ float s_weight[kMaxTopK];
    const int t = blockIdx.x;
    const int* pair_pos = c.workspace + ws.pair_pos(c.slot);
    if (static_cast<int>(threadIdx.x) < c.num_topk) {
        const int k = threadIdx.x;
        const int64_t pair = static_cast<int64_t>(t) * c.num_topk + k;
        const int64_t e = c.topk_idx[pair];
        int64_t offset = -1;
        if (e >= 0 && !cut && !rank_masked(c, static_cast<int>(e / num_local))) {
            const int pos = pair_pos[pair];
            if (pos < c.num_max_tokens) {  // pairs past a full block were never sent
                uint64_t waited = 0;
                if (wait_signal(signals + e, epoch, c.timeout_ns, &waited) < 0) {
                    if (!c.shrink) ll_timeout_trap("low_latency_combine", "receive: waiting for the expert's rows", c.rank,
                                                   static_cast<int>(e), static_cast<int>(e / num_local), epoch, signals[e]);
                    atomicExch(c.mask + e / num_local, 1);
                    store_host_flag(c.host_flags, 1, 1);
                } else {
                    offset = c.recv_offset[c.slot] + (e * c.num_max_tokens + pos) * (2 * static_cast<int64_t>(c.hidden));
                }
            }
        }
        s_offset[k] = offset;
        s_weight[k] = offset >= 0 ? c.topk_weights[pair] : 0.0f;
    }
    __syncthreads();
    const int num_int4 = c.hidden / 8;
    int4* out = reinterpret_cast<int4*>(static_cast<__nv_bfloat16*>(c.combined_x) + static_cast<int64_t>(t) * c.hidden);
    for (int q = threadIdx.x; q < num_int4; q += kThreads) {
        float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        for (int k = 0; k < c.num_topk; ++k) {
            if (s_offset[k] < 0) continue;
            const int4 v = ptx::ld_na_global_v4(reinterpret_cast<const int4*>(local + s_offset[k]) + q);
            __nv_bfloat16 h[8];
            memcpy(h, &v, sizeof(h));  // defined behaviour in C++ (no pointer pun), free under nvcc
            const float w = s_weight[k];
#pragma unroll
            for (int i = 0; i < 8; ++i) acc[i] = __fadd_rn(acc[i], __fmul_rn(w, __bfloat162float(h[i])));
        }
        out[q] = pack_bf16x8(acc);
    }
}

}  // namespace

void prepare(const deep_ep_ll_call& c, cudaStream_t stream) {
    check_call(c);
    const int cast_blocks = c.kind == DEEP_EP_LL_DISPATCH ? c.num_tokens : 0;
    const int list_blocks = (c.num_experts + kWarps - 1) / kWarps;
    DEEP_EP_LAUNCH(prepare_kernel, cast_blocks + list_blocks, kThreads, 0, stream, c, cast_blocks);
    DEEP_EP_CHECK_LAUNCH("low_latency prepare");
}

void receive(const deep_ep_ll_call& c, cudaStream_t stream) {
    check_call(c);
    const int num_local = c.num_experts / c.num_ranks;
    if (c.kind == DEEP_EP_LL_DISPATCH) {
        int parts = (c.num_sms + num_local - 1) / num_local;
        parts = parts < 1 ? 1 : (parts > kMaxRecvParts ? kMaxRecvParts : parts);
        DEEP_EP_LAUNCH(dispatch_recv_kernel, num_local * parts, kThreads, 0, stream, c, parts);
        DEEP_EP_CHECK_LAUNCH("low_latency dispatch receive");
    } else {
        const int blocks = c.num_tokens + (c.wait_stats != nullptr ? 1 : 0);
        if (blocks > 0) {
            DEEP_EP_LAUNCH(combine_recv_kernel, blocks, kThreads, 0, stream, c);
            DEEP_EP_CHECK_LAUNCH("low_latency combine receive");
        }
    }
}

// The peer-memory instantiation of the send kernels.
template void launch_send<transport::PeerTransport>(const deep_ep_ll_call&, const transport::PeerTransport&, cudaStream_t);

}  // namespace ll
}  // namespace deep_ep

// Low-latency (LL) mode: shared definitions of the kernels in low_latency.cu (transport-free: prepare,
// receive) and low_latency_send.cuh (templates on the transport: dispatch and combine sends).
//
// Protocol of one call (docs/semantics.md "Low-latency dispatch/combine"; the outputs equal the
// portable engine's, deep_ep/engines/portable_ll.py):
//
//   prepare  (this rank)  bump the slot's epoch; per global expert e, the list of this rank's (t, k)
//                         pairs with topk_idx == e in (t, k) order (a warp ballot scan): count[e],
//                         position of each pair, token of each position; dispatch also casts every
//                         token once into the send area: [int32 t | pad to 16 | payload].
//   dispatch send         block per global expert e: put the tokens of e's list to e's rank, into its
//                         receive slot [e_local][this rank][position]; then one signal word per
//                         (e_local, this rank) = pack(epoch, count).
//   dispatch recv         per local expert: wait for the R signals, prefix-sum the counts over sources
//                         (deterministic: block s starts after the blocks of sources < s), unpack rows
//                         in (source, position) order into recv_x / scales / src_info.
//   combine send          block per (local expert, source s): the s block's rows go back to s, into
//                         s's slot [global expert][position] (2H bytes apart: always 16-byte aligned,
//                         unlike the zero-copy view's rows); then signal word [global expert].
//   combine recv          block per token: wait for the signals of its experts; reduce in k order.
//
// The positions come from counts computed before anything moves (no racing atomics), which is what
// makes the order deterministic. Signal words carry the slot's epoch (a per-slot use counter kept in
// device memory by every rank), so they never need to be cleared between calls and a CUDA graph that
// replays a call stays correct: the words of an earlier use of the slot have an older epoch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <cstdint>
#include <cstdio>
#include <cstring>

#include <string>

#include "../deep_ep_ll.h"
#include "exception.cuh"
#include "ptx.cuh"
#include "utils.cuh"

namespace deep_ep {
namespace ll {

constexpr int kMaxTopK = 16;         // Buffer allows top-k <= 16 in LL mode
constexpr int kMaxTokens = 1024;     // num_max_dispatch_tokens_per_rank
constexpr int kMaxRanks = 1024;      // shared-memory tables of the receive kernels
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kCountBits = 11;       // count + 1 < 2048
constexpr int kMaxSignalCount = (1 << kCountBits) - 2;  // counts above T_max travel (capped) to flag overflow
constexpr int kEpochMax = (1 << 20) - 1;
constexpr int kMaxRecvParts = 16;    // blocks per local expert in the dispatch receive
constexpr int kGroup = 128;          // FP8 scale block / LogFMT group

// Workspace words (int32); see deep_ep_ll.h. K is fixed at kMaxTopK so that the size depends on
// (T_max, E, R) only.
struct Workspace {
    int64_t t_max, experts, local_experts, per_slot;

    __host__ __device__ Workspace(int64_t num_max_tokens, int64_t num_experts, int64_t num_ranks)
        : t_max(num_max_tokens), experts(num_experts), local_experts(num_experts / num_ranks) {
        const int64_t words = experts + t_max * kMaxTopK + experts * t_max + experts + local_experts;
        per_slot = (words + 31) / 32 * 32;
    }
    __host__ __device__ int64_t slot_base(int slot) const { return DEEP_EP_LL_WS_HEADER + slot * per_slot; }
    __host__ __device__ int64_t expert_count(int slot) const { return slot_base(slot); }
    __host__ __device__ int64_t pair_pos(int slot) const { return slot_base(slot) + experts; }
    __host__ __device__ int64_t token_list(int slot) const { return pair_pos(slot) + t_max * kMaxTopK; }
    __host__ __device__ int64_t recv_counts(int slot) const { return token_list(slot) + experts * t_max; }
    __host__ __device__ int64_t ready(int slot) const { return recv_counts(slot) + experts; }
    __host__ __device__ int64_t total_words() const { return DEEP_EP_LL_WS_HEADER + 2 * per_slot; }
};

// DeepEP V1's LL buffer layout [sig0][sig1][send0][send1][recv0][recv1] (bytes), identical to
// deep_ep.config.LowLatencyLayout (tests/test_core_host_ll.py compares them).
struct LowLatencyLayout {
    static constexpr int64_t kRegionAlign = 128;
    int64_t signaling_bytes, send_bytes, recv_bytes, dispatch_msg_bytes, combine_msg_bytes;

    __host__ __device__ LowLatencyLayout(int64_t num_max_tokens, int64_t hidden, int64_t num_experts) {
        const int64_t num_scales = hidden / kGroup;
        dispatch_msg_bytes = 16 + (2 * hidden > hidden + 4 * num_scales ? 2 * hidden : hidden + 4 * num_scales);
        combine_msg_bytes = 4 * num_scales + 2 * hidden;
        signaling_bytes = align_region(num_experts * 4);
        const int64_t combine = num_experts * num_max_tokens * combine_msg_bytes;
        const int64_t dispatch_send = num_max_tokens * dispatch_msg_bytes;
        const int64_t dispatch_recv = num_experts * num_max_tokens * dispatch_msg_bytes;
        // Every region is rounded up to 128 bytes, so that every offset is 128-byte aligned whatever
        // (T_max, hidden, E) are (a combine message is 260 * hidden / 128 bytes: E * T_max of them need
        // not be a multiple of 16, and the kernels' 16-byte accesses would fault).
        send_bytes = align_region(dispatch_send > combine ? dispatch_send : combine);
        recv_bytes = align_region(dispatch_recv > combine ? dispatch_recv : combine);
    }
    __host__ __device__ static int64_t align_region(int64_t bytes) { return (bytes + kRegionAlign - 1) / kRegionAlign * kRegionAlign; }
    __host__ __device__ int64_t signaling_offset(int slot) const { return slot * signaling_bytes; }
    __host__ __device__ int64_t send_offset(int slot) const { return 2 * signaling_bytes + slot * send_bytes; }
    __host__ __device__ int64_t recv_offset(int slot) const { return 2 * signaling_bytes + 2 * send_bytes + slot * recv_bytes; }
    __host__ __device__ int64_t total_bytes() const { return 2 * (signaling_bytes + send_bytes + recv_bytes); }
};

// The epoch of slot s lives in workspace word s.
__host__ __device__ __forceinline__ int next_epoch(int epoch) { return epoch % kEpochMax + 1; }

// ---- per-call bookkeeping of a slot's workspace words. The kernels run these functions, and so do the
// host replay entry points of capi.cu (deep_ep_ll_host_begin_slot, ...) that the CPU tests drive.
//
// The dispatch receive splits a local expert over `parts` blocks: part 0 waits for the sources' signals,
// writes the counts to the workspace and then publishes them in the expert's "ready" word; parts > 0 wait
// for that word. The word must never hold the value they wait for before part 0 of THIS call stored it,
// so it does not persist across calls: the prepare kernel of every call clears the slot's ready words
// (stream order puts it after the previous receive on the slot and before this call's receive). An
// epoch alone is not enough: clean_low_latency_buffer resets the epochs, epochs wrap, and a workspace
// reused for another shape puts the ready words on bytes that held counts or token lists.
__host__ __device__ __forceinline__ void begin_slot_call(int* workspace, const Workspace& ws, int slot, int thread,
                                                         int num_threads) {
    if (thread == 0) workspace[slot] = next_epoch(workspace[slot]);
    for (int64_t j = thread; j < ws.local_experts; j += num_threads) workspace[ws.ready(slot) + j] = 0;
}
// The value part 0 publishes, and the test of parts > 0 (the epoch is never 0, a cleared word never matches).
__host__ __device__ __forceinline__ int ready_value(int epoch) { return epoch; }
__host__ __device__ __forceinline__ bool counts_published(int observed, int epoch) { return observed == ready_value(epoch); }
__host__ __device__ __forceinline__ int pack_signal(int epoch, int count) {
    return (epoch << kCountBits) | (count + 1);
}
__host__ __device__ __forceinline__ int signal_epoch(int value) { return value >> kCountBits; }
__host__ __device__ __forceinline__ int signal_count(int value) { return (value & ((1 << kCountBits) - 1)) - 1; }

// Bytes of a dispatch message actually sent: 16-byte header + payload, rounded up to 16.
__host__ __device__ __forceinline__ int64_t dispatch_put_bytes(int hidden, bool use_fp8) {
    const int64_t payload = use_fp8 ? hidden + 4 * (hidden / kGroup) : 2 * static_cast<int64_t>(hidden);
    return (16 + payload + 15) / 16 * 16;
}

__device__ __forceinline__ bool rank_masked(const deep_ep_ll_call& c, int r) {
    return c.shrink && ptx::ld_relaxed_sys_global(c.mask + r) != 0;
}

// Prints who waited for what and traps (non-shrink mode), after `timeout_ns` of a bounded wait.
__device__ __forceinline__ void ll_timeout_trap(const char* kernel, const char* phase, int rank, int expert,
                                                    int peer, int epoch, int observed) {
    printf("deep_ep timeout in %s (%s): rank %d, expert %d, peer %d, expected epoch %d, observed signal 0x%x "
           "(epoch %d): the peer did not send; is it alive and running the same sequence of low-latency calls?\n",
           kernel, phase, rank, expert, peer, epoch, observed, signal_epoch(observed));
    __trap();
}

// Waits until the int32 signal word at `p` (this rank's memory) carries `epoch`. Returns the word, or
// -1 when it timed out. `waited_ns` gets the time spent.
__device__ __forceinline__ int wait_signal(const int* p, int epoch, uint64_t timeout_ns, uint64_t* waited_ns) {
    const uint64_t start = ptx::globaltimer_ns();
    SpinWait wait(timeout_ns);
    int value;
    while (signal_epoch(value = ptx::ld_acquire_sys_global(p)) != epoch) {
        if (wait.expired()) {
            *waited_ns = ptx::globaltimer_ns() - start;
            return -1;
        }
    }
    *waited_ns = ptx::globaltimer_ns() - start;
    return value;
}

// ---- scalar quantisation math, shared by the kernels and the host test entry points (capi.cu), so the
// CPU tests check the very formulas the kernels run. Every float op is one IEEE round-to-nearest op
// (the device intrinsics below; on the host the plain operators, which are the same operations).
__host__ __device__ __forceinline__ float ieee_div(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fdiv_rn(a, b);
#else
    return a / b;
#endif
}
__host__ __device__ __forceinline__ float ieee_mul(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fmul_rn(a, b);
#else
    volatile float r = a * b;  // volatile: no contraction into an FMA with a later add
    return r;
#endif
}
__host__ __device__ __forceinline__ float ieee_add(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fadd_rn(a, b);
#else
    volatile float r = a + b;
    return r;
#endif
}
__host__ __device__ __forceinline__ float ieee_sub(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fsub_rn(a, b);
#else
    volatile float r = a - b;
    return r;
#endif
}
__host__ __device__ __forceinline__ float bits_to_float(uint32_t b) {
    float f;
    memcpy(&f, &b, 4);
    return f;
}
__host__ __device__ __forceinline__ uint32_t float_to_bits(float f) {
    uint32_t b;
    memcpy(&b, &f, 4);
    return b;
}
__host__ __device__ __forceinline__ float bf16_bits_to_float(uint16_t b) { return bits_to_float(static_cast<uint32_t>(b) << 16); }
__host__ __device__ __forceinline__ uint16_t float_to_bf16_bits(float x) {
    const __nv_bfloat16 h = __float2bfloat16_rn(x);
    uint16_t b;
    memcpy(&b, &h, 2);
    return b;
}
__host__ __device__ __forceinline__ float bf16_round(float x) { return bf16_bits_to_float(float_to_bf16_bits(x)); }

// FP8 scale of a 128-block from its max |x|: floor 1e-4, IEEE divide by 448, optional exact
// power-of-two rounding up from the bits (a power of two stays).
__host__ __device__ __forceinline__ float fp8_scale_inv(float amax, bool round_scale) {
    amax = fmaxf(amax, 1e-4f);
    float scale_inv = ieee_div(amax, 448.0f);
    if (round_scale) {
        const uint32_t bits = float_to_bits(scale_inv);
        const uint32_t exponent = ((bits >> 23) & 0xffu) + ((bits & 0x7fffffu) != 0 ? 1u : 0u);
        scale_inv = bits_to_float(exponent << 23);
    }
    return scale_inv;
}

// One element: x * inv (inv = IEEE 1 / scale_inv), clamp to +-448, RNE cast to e4m3.
__host__ __device__ __forceinline__ uint8_t fp8_quantize(float x, float inv) {
    const float y = fminf(fmaxf(ieee_mul(x, inv), -448.0f), 448.0f);
    return static_cast<uint8_t>(__nv_cvt_float_to_fp8(y, __NV_SATFINITE, __NV_E4M3));
}

// LogFMT-10 parameters of a group from its min nonzero / max |x| (and whether it holds inf/NaN).
struct LogfmtGroup {
    bool passthrough;  // all zero, or BF16 fallback: the group is sent unchanged
    float lo, step;
};

__host__ __device__ __forceinline__ LogfmtGroup logfmt10_group(float amin, float amax, bool nonfinite) {
    LogfmtGroup g{true, 0.0f, 0.0f};
    if (amax == 0.0f && !nonfinite) return g;  // all zero: codes 0, signs kept = unchanged
    g.lo = bf16_round(log2f(amin));
    const float hi = bf16_round(log2f(amax));
    g.step = ieee_div(ieee_sub(hi, g.lo), 510.0f);
    g.passthrough = nonfinite || !(g.step <= 1.0f / 32.0f);  // BF16 fallback
    return g;
}

// One element of a LogFMT group (not passthrough): encode to a 9-bit code, decode, round to bf16, sign.
__host__ __device__ __forceinline__ uint16_t logfmt10_element(uint16_t bits, const LogfmtGroup& g) {
    const float a = fabsf(bf16_bits_to_float(bits));
    if (a == 0.0f) return bits;  // code 0 keeps the sign bit
    float ratio = 0.0f;
    if (g.step > 0.0f) ratio = rintf(ieee_div(ieee_sub(log2f(a), g.lo), g.step));
    ratio = fminf(fmaxf(ratio, 0.0f), 510.0f);
    const int code = static_cast<int>(ratio) + 1;
    const float e = ieee_add(g.lo, ieee_mul(static_cast<float>(code - 1), g.step));
    return static_cast<uint16_t>(float_to_bf16_bits(exp2f(e)) | (bits & 0x8000u));
}

// LogFMT-10 rounding of one 128-channel group held by a half-warp (16 lanes x 8 values), exactly the
// arithmetic of deep_ep.quant.logfmt10_encode/decode. All 32 lanes must call it (the shuffles stay
// inside each half). Returns the rounded bf16 values, packed.
__device__ __forceinline__ int4 logfmt10_round_half(int4 packed) {
    uint16_t bits[8];
    memcpy(bits, &packed, sizeof(bits));  // no pointer pun (defined behaviour in C++)
    float amax = 0.0f, amin = __int_as_float(0x7f800000);
    int nonfinite = 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const float a = fabsf(bf16_bits_to_float(bits[i]));
        nonfinite |= !isfinite(a);
        amax = fmaxf(amax, a);
        if (a != 0.0f) amin = fminf(amin, a);
    }
#pragma unroll
    for (int m = 8; m >= 1; m >>= 1) {
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, m));
        amin = fminf(amin, __shfl_xor_sync(0xffffffffu, amin, m));
        nonfinite |= __shfl_xor_sync(0xffffffffu, nonfinite, m);
    }
    const LogfmtGroup g = logfmt10_group(amin, amax, nonfinite != 0);
    if (g.passthrough) return packed;
    uint16_t o[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) o[i] = logfmt10_element(bits[i], g);
    int4 out;
    memcpy(&out, o, sizeof(out));
    return out;
}

// Host-side checks of a call (every launcher runs them; the messages name the user-visible values).
inline void check_call(const deep_ep_ll_call& c) {
    const auto fail = [](const std::string& what) { throw Error("deep_ep low-latency kernels: " + what); };
    if (c.kind != DEEP_EP_LL_DISPATCH && c.kind != DEEP_EP_LL_COMBINE) fail("bad call kind " + std::to_string(c.kind));
    if (c.num_ranks < 1 || c.num_ranks > kMaxRanks) fail("num_ranks must be in [1, 1024], got " + std::to_string(c.num_ranks));
    if (c.rank < 0 || c.rank >= c.num_ranks) fail("bad rank " + std::to_string(c.rank));
    if (c.slot != 0 && c.slot != 1) fail("bad slot");
    if (c.device < 0) fail("bad device " + std::to_string(c.device));
    if (c.num_experts < c.num_ranks || c.num_experts % c.num_ranks != 0)
        fail("num_experts must be a positive multiple of the number of ranks, got " + std::to_string(c.num_experts));
    if (c.num_max_tokens < 1 || c.num_max_tokens > kMaxTokens)
        fail("num_max_dispatch_tokens_per_rank must be in [1, 1024], got " + std::to_string(c.num_max_tokens));
    if (c.num_tokens < 0 || c.num_tokens > c.num_max_tokens)
        fail("num_tokens " + std::to_string(c.num_tokens) + " exceeds num_max_dispatch_tokens_per_rank");
    if (c.hidden <= 0 || c.hidden % kGroup != 0) fail("hidden must be a positive multiple of 128, got " + std::to_string(c.hidden));
    if (c.num_topk < 1 || c.num_topk > kMaxTopK) fail("num_topk must be in [1, 16], got " + std::to_string(c.num_topk));
    if (c.use_ue8m0 && !c.round_scale) fail("use_ue8m0 needs round_scale");
    if (c.buffer == nullptr || c.workspace == nullptr || c.mask == nullptr || c.host_flags == nullptr)
        fail("null buffer/workspace/mask/flags");
    if (c.dispatch_msg_bytes % 16 != 0 || c.combine_msg_bytes % 4 != 0 ||
        c.dispatch_msg_bytes < dispatch_put_bytes(c.hidden, c.use_fp8 != 0) || c.combine_msg_bytes < 2LL * c.hidden)
        fail("message sizes do not match the layout");
}

// Launchers (low_latency.cu). `phases` of a dispatch/combine are split so that a send and its
// receive can be launched at different times (return_recv_hook).
void prepare(const deep_ep_ll_call& c, cudaStream_t stream);
void receive(const deep_ep_ll_call& c, cudaStream_t stream);

}  // namespace ll
}  // namespace deep_ep

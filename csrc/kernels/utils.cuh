// Device helpers shared by the kernels: bounded waits, warp copies, bf16 packing.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>
#include <cstdio>
#include <cstring>

#include "config.cuh"
#include "ptx.cuh"

namespace deep_ep {

// Who is waiting, for the timeout message.
enum class WaitRole : int {
    kBarrier = 0,
    kDispatchSender = 1,    // sender waiting for free ring slots (receiver's head)
    kDispatchReceiver = 2,  // receiver waiting for tokens (sender's tail)
    kCombineSender = 3,
    kCombineReceiver = 4,
    kForwarderTokens = 5,   // internode forwarder waiting for messages (sender's tail)
    kForwarderSlots = 6,    // internode forwarder waiting for free slots (receiver's head)
};

__device__ __forceinline__ const char* wait_role_name(WaitRole role) {
    switch (role) {
        case WaitRole::kBarrier: return "barrier";
        case WaitRole::kDispatchSender: return "dispatch sender (waiting for free slots)";
        case WaitRole::kDispatchReceiver: return "dispatch receiver (waiting for tokens)";
        case WaitRole::kCombineSender: return "combine sender (waiting for free slots)";
        case WaitRole::kCombineReceiver: return "combine receiver (waiting for rows)";
        case WaitRole::kForwarderTokens: return "forwarder (waiting for tokens)";
        case WaitRole::kForwarderSlots: return "forwarder (waiting for free slots)";
    }
    return "?";
}

// A bounded spin-wait. `expired()` is cheap on most calls (the timer is read every
// kSpinsPerTimerCheck polls). On expiry the caller reports and traps: a trap poisons the context,
// which is the only safe outcome once a peer has stopped answering.
struct SpinWait {
    uint64_t start_ns;
    uint64_t timeout_ns;
    int spins;

    __device__ __forceinline__ explicit SpinWait(uint64_t timeout) : start_ns(ptx::globaltimer_ns()),
                                                                     timeout_ns(timeout), spins(0) {}

    __device__ __forceinline__ bool expired() {
        if (++spins % kSpinsPerTimerCheck != 0) return false;
        return ptx::globaltimer_ns() - start_ns > timeout_ns;
    }
};

// Prints the stuck wait (kernel, role, rank, channel, peer, expected and observed values) and traps.
__device__ __noinline__ inline void report_timeout_and_trap(const char* kernel, WaitRole role, int rank, int channel,
                                                            int peer, int expected, int observed) {
    printf("deep_ep timeout in %s: %s, rank %d, channel %d, peer %d, expected %d, observed %d\n", kernel,
           wait_role_name(role), rank, channel, peer, expected, observed);
    __trap();
}

// Copies `num_int4` 16-byte words with one warp (lane-strided, so every access is coalesced);
// kUnroll loads are in flight per lane (fewer where registers are short).
template <int kUnroll = 4>
__device__ __forceinline__ void warp_copy_nc_to_global(int4* dst, const int4* src, int64_t num_int4, int lane) {
    int64_t i = lane;
    for (; i + (kUnroll - 1) * 32 < num_int4; i += kUnroll * 32) {
        int4 v[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) v[u] = ptx::ld_nc_global_v4(src + i + u * 32);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) dst[i + u * 32] = v[u];
    }
    for (; i < num_int4; i += 32) dst[i] = ptx::ld_nc_global_v4(src + i);
}

// Same, reading a ring slot (see ptx::ld_na_global_v4 for why not .nc).
template <int kUnroll = 4>
__device__ __forceinline__ void warp_copy_ring_to_global(int4* dst, const int4* src, int64_t num_int4, int lane) {
    int64_t i = lane;
    for (; i + (kUnroll - 1) * 32 < num_int4; i += kUnroll * 32) {
        int4 v[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) v[u] = ptx::ld_na_global_v4(src + i + u * 32);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) dst[i + u * 32] = v[u];
    }
    for (; i < num_int4; i += 32) dst[i] = ptx::ld_na_global_v4(src + i);
}

// 8 bf16 values packed in an int4 <-> 8 floats.
// (memcpy, not a pointer cast: defined behaviour in C++, and free under nvcc.)
__device__ __forceinline__ void add_bf16x8(float (&acc)[8], int4 packed) {
    __nv_bfloat162 h[4];
    memcpy(h, &packed, sizeof(h));
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 f = __bfloat1622float2(h[i]);
        acc[2 * i] += f.x;
        acc[2 * i + 1] += f.y;
    }
}

__device__ __forceinline__ int4 pack_bf16x8(const float (&acc)[8]) {
    __nv_bfloat162 h[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(acc[2 * i], acc[2 * i + 1]);
    int4 packed;
    memcpy(&packed, h, sizeof(packed));
    return packed;
}

}  // namespace deep_ep

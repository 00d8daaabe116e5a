// Inline PTX, and only here. Each wrapper is one instruction; names read op_semantics_scope_space.
//
// Why system scope: ranks may live in other processes (CUDA IPC) on other GPUs (NVLink), or share
// this GPU from another process (time-sliced contexts). `.sys` is the scope that covers all three;
// `.gpu` would not order accesses seen by another GPU.
#pragma once

#include <cstdint>

namespace deep_ep {
namespace ptx {

// Acquire load of a flag (ring head/tail, barrier signal): later loads of this thread observe
// every write the releasing thread made before its matching release.
__device__ __forceinline__ int ld_acquire_sys_global(const int* ptr) {
    int value;
    asm volatile("ld.acquire.sys.global.s32 %0, [%1];" : "=r"(value) : "l"(ptr) : "memory");
    return value;
}

// Release store of a flag: every earlier load and store of this thread (and, through bar.sync,
// of the threads it synchronised with) is visible before the flag is.
__device__ __forceinline__ void st_release_sys_global(int* ptr, int value) {
    asm volatile("st.release.sys.global.s32 [%0], %1;" ::"l"(ptr), "r"(value) : "memory");
}

// Relaxed store, for plain metadata words published later by a release (or a barrier).
__device__ __forceinline__ void st_relaxed_sys_global(int* ptr, int value) {
    asm volatile("st.relaxed.sys.global.s32 [%0], %1;" ::"l"(ptr), "r"(value) : "memory");
}

// Relaxed load of metadata another rank wrote before a barrier this thread already passed.
__device__ __forceinline__ int ld_relaxed_sys_global(const int* ptr) {
    int value;
    asm volatile("ld.relaxed.sys.global.s32 %0, [%1];" : "=r"(value) : "l"(ptr) : "memory");
    return value;
}

// Release reduction (no return value): the barrier's "I arrived" signal, ordered after this
// thread's earlier writes.
__device__ __forceinline__ void red_add_release_sys_global(int* ptr, int value) {
    asm volatile("red.release.sys.global.add.s32 [%0], %1;" ::"l"(ptr), "r"(value) : "memory");
}

// 16-byte load that does not allocate in L1. Used for ring slots: a slot is rewritten by its sender
// after the receiver frees it, so a line kept in L1 from an earlier lap could be stale. Without
// `.nc` this is an ordinary (weak) load, so the acquire that guards it is enough for ordering.
__device__ __forceinline__ int4 ld_na_global_v4(const int4* ptr) {
    int4 v;
    asm volatile("ld.global.L1::no_allocate.v4.s32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(ptr));
    return v;
}

// 4-byte load without L1 allocation (ring metadata: source index, top-k, scales, weights).
__device__ __forceinline__ int ld_na_global(const int* ptr) {
    int v;
    asm volatile("ld.global.L1::no_allocate.s32 %0, [%1];" : "=r"(v) : "l"(ptr));
    return v;
}

// Read-only 16-byte load through the non-coherent path: only for kernel inputs that no one writes
// while the kernel runs (x, biases).
__device__ __forceinline__ int4 ld_nc_global_v4(const int4* ptr) {
    int4 v;
    asm volatile("ld.global.nc.v4.s32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(ptr));
    return v;
}

// Nanoseconds since an arbitrary epoch, shared by all SMs. Timeouts use it rather than clock64():
// it keeps counting while this context is time-sliced out, which happens when several ranks share
// one GPU.
__device__ __forceinline__ uint64_t globaltimer_ns() {
    uint64_t t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// Named barrier over `num_threads` threads (a multiple of 32) of this block. Id 0 is
// __syncthreads(); the kernels use ids 1..kMaxNvlRanks, one per peer team. Called by whole warps;
// bar.sync is `.aligned` (every thread of the warp must execute the same instance), so the warp is
// converged first: one lane may arrive from a spin-wait the others skipped.
__device__ __forceinline__ void bar_sync(int id, int num_threads) {
    __syncwarp();
    asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(num_threads) : "memory");
}

}  // namespace ptx
}  // namespace deep_ep

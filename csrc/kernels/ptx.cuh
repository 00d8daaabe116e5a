// Inline PTX, and only here. Each wrapper is one instruction; names read op_semantics_scope_space.
// This header is also the only place that differs between the GPU build and the emulated CPU build
// (DEEP_EP_EMULATOR, csrc/emu/): the second branch gives every helper the same contract with C++
// atomics, and makes acquire/relaxed loads and the timer spin points of the emulator's scheduler.
// Kernel launches (DEEP_EP_LAUNCH) and dynamic shared memory (dynamic_shared_memory) go through here
// for the same reason. tests/test_emu.py rejects `asm` and `<<<` anywhere else in csrc/.
//
// Why system scope: ranks may live in other processes (CUDA IPC) on other GPUs (NVLink), or share
// this GPU from another process (time-sliced contexts). `.sys` is the scope that covers all three;
// `.gpu` would not order accesses seen by another GPU.
#pragma once

#include <cstdint>

namespace deep_ep {
namespace ptx {

#ifdef DEEP_EP_EMULATOR
// ------------------------------------------------------------------ emulated build (csrc/emu/)
// The extra defaulted arguments carry the call site into deadlock and watchdog reports.

__device__ __forceinline__ int ld_acquire_sys_global(const int* ptr, const char* file = __builtin_FILE(),
                                                     int line = __builtin_LINE()) {
    ::deep_ep::emu::spin_point(ptr, file, line);
    return __atomic_load_n(ptr, __ATOMIC_ACQUIRE);
}

__device__ __forceinline__ void st_release_sys_global(int* ptr, int value) {
    __atomic_store_n(ptr, value, __ATOMIC_RELEASE);
}

__device__ __forceinline__ void st_relaxed_sys_global(int* ptr, int value) {
    __atomic_store_n(ptr, value, __ATOMIC_RELAXED);
}

__device__ __forceinline__ int ld_relaxed_sys_global(const int* ptr, const char* file = __builtin_FILE(),
                                                     int line = __builtin_LINE()) {
    ::deep_ep::emu::spin_point(ptr, file, line);
    return __atomic_load_n(ptr, __ATOMIC_RELAXED);
}

__device__ __forceinline__ void red_add_release_sys_global(int* ptr, int value) {
    ::deep_ep::emu::atomic_point();
    __atomic_fetch_add(ptr, value, __ATOMIC_RELEASE);
}

__device__ __forceinline__ uint64_t ld_acquire_sys_global(const uint64_t* ptr, const char* file = __builtin_FILE(),
                                                          int line = __builtin_LINE()) {
    ::deep_ep::emu::spin_point(ptr, file, line);
    return __atomic_load_n(ptr, __ATOMIC_ACQUIRE);
}

__device__ __forceinline__ void st_release_sys_global(uint64_t* ptr, uint64_t value) {
    __atomic_store_n(ptr, value, __ATOMIC_RELEASE);
}

__device__ __forceinline__ void st_relaxed_sys_global(uint64_t* ptr, uint64_t value) {
    __atomic_store_n(ptr, value, __ATOMIC_RELAXED);
}

__device__ __forceinline__ void red_add_release_sys_global(uint64_t* ptr, uint64_t value) {
    ::deep_ep::emu::atomic_point();
    __atomic_fetch_add(ptr, value, __ATOMIC_RELEASE);
}

__device__ __forceinline__ int4 ld_na_global_v4(const int4* ptr) { return *ptr; }

__device__ __forceinline__ int ld_na_global(const int* ptr) { return *ptr; }

__device__ __forceinline__ int4 ld_nc_global_v4(const int4* ptr) { return *ptr; }

__device__ __forceinline__ uint64_t globaltimer_ns(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return ::deep_ep::emu::globaltimer_ns(file, line);
}

__device__ __forceinline__ void bar_sync(int id, int num_threads, const char* file = __builtin_FILE(),
                                         int line = __builtin_LINE()) {
    __syncwarp(0xffffffffu, file, line);
    ::deep_ep::emu::bar_sync(id, num_threads, file, line);
}

// The launch's dynamic shared memory (`smem` bytes of DEEP_EP_LAUNCH), as T[].
template <typename T>
__device__ __forceinline__ T* dynamic_shared_memory() {
    return static_cast<T*>(::deep_ep::emu::dynamic_smem());
}

#else
// ------------------------------------------------------------------------------- GPU build

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

// The 64-bit forms of the four above, for the internode flags (NVSHMEM signal words are uint64_t).
__device__ __forceinline__ uint64_t ld_acquire_sys_global(const uint64_t* ptr) {
    uint64_t value;
    asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(value) : "l"(ptr) : "memory");
    return value;
}

__device__ __forceinline__ void st_release_sys_global(uint64_t* ptr, uint64_t value) {
    asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(ptr), "l"(value) : "memory");
}

__device__ __forceinline__ void st_relaxed_sys_global(uint64_t* ptr, uint64_t value) {
    asm volatile("st.relaxed.sys.global.u64 [%0], %1;" ::"l"(ptr), "l"(value) : "memory");
}

__device__ __forceinline__ void red_add_release_sys_global(uint64_t* ptr, uint64_t value) {
    asm volatile("red.release.sys.global.add.u64 [%0], %1;" ::"l"(ptr), "l"(value) : "memory");
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


// The launch's dynamic shared memory (`smem` bytes of DEEP_EP_LAUNCH), as T[].
template <typename T>
__device__ __forceinline__ T* dynamic_shared_memory() {
    extern __shared__ int4 deep_ep_dynamic_smem[];
    return reinterpret_cast<T*>(deep_ep_dynamic_smem);
}

#endif  // DEEP_EP_EMULATOR

}  // namespace ptx
}  // namespace deep_ep

#ifndef DEEP_EP_EMULATOR
// Every kernel launch of csrc/ (the emulated build defines it in csrc/emu/emu.h):
//   DEEP_EP_LAUNCH(kernel, grid, block, dynamic_smem_bytes, stream, kernel arguments...)
#define DEEP_EP_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)
#endif

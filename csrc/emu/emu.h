// CUDA kernel emulator: the device-side vocabulary of the deep_ep kernels, for compiling the kernels'
// own source as C++ with the host compiler (DEEP_EP_EMULATOR builds, see csrc/emu/README.md).
//
// Force-included (-include emu/emu.h) before every source of the CPU build. Execution model:
// every block of a launch runs on its own OS thread (all blocks resident unless capped), every CUDA
// thread of a block is a fiber on that thread, switched cooperatively at __syncthreads, named
// barriers, warp collectives and spin points (acquire loads, the global timer). __shared__ variables
// are thread_local: one copy per block. Nothing here is used by the nvcc build.
#pragma once

#ifndef DEEP_EP_EMULATOR
#error "emu/emu.h is only for the emulated (CPU) build of the deep_ep core"
#endif

// Standard headers first: libstdc++ uses `__attribute__((__noinline__))`, which the CUDA keyword
// macro below would break if a header were first included after it.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

// One copy per block: every block runs on its own OS thread. (Defined before the CUDA headers,
// which keep an existing definition.)
#define __shared__ static thread_local

#include <cuda_runtime_api.h>
#include <vector_functions.h>
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#ifndef __noinline__
#define __noinline__ __attribute__((noinline))
#endif
#define __launch_bounds__(...)
#ifndef __grid_constant__
#define __grid_constant__
#endif

namespace deep_ep {
namespace emu {

// ------------------------------------------------------------------------------- thread identity
// Out of line (not inline TLS reads): UBSan misreads relaxed TLS accesses as null pointers.
uint3 thread_idx();
uint3 block_idx();
dim3 block_dim();
dim3 grid_dim();

// ------------------------------------------------------------------------------ synchronisation
// Block barrier `id` over `count` threads (count < 0: every live thread, i.e. __syncthreads).
void bar_sync(int id, int count, const char* file, int line);
// A spin point: other fibers of this block run before the caller continues. `addr` (may be null)
// and the site go into deadlock/watchdog reports.
void spin_point(const void* addr, const char* file, int line);
// Yield at an atomic when random scheduling is on (more interleavings); no-op otherwise.
void atomic_point();
[[noreturn]] void trap(const char* file, int line);
// Device printf: printed at once; inside a kernel the text is also kept for the error a trap raises.
int device_printf(const char* format, ...) __attribute__((format(printf, 1, 2)));
uint64_t globaltimer_ns(const char* file, int line);

enum class CollKind : int { kSyncWarp, kBallot, kAny, kAll, kShfl, kShflXor, kShflDown, kShflUp };
// A warp collective: every lane of `mask` must arrive at the same call site; returns this lane's
// result (the value of the collective's own rule, see emu.cpp).
uint64_t warp_collective(CollKind kind, unsigned mask, uint64_t value, int arg, int width, const char* file, int line);

template <typename T>
inline uint64_t to_bits(T v) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "warp collective on a type over 8 bytes");
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    return bits;
}
template <typename T>
inline T from_bits(uint64_t bits) {
    T v;
    std::memcpy(&v, &bits, sizeof(T));
    return v;
}

// --------------------------------------------------------------------------------------- launch
// The dynamic shared memory of the running block (the launch's `smem` bytes, 16-byte aligned).
void* dynamic_smem();
// Runs `body` (which calls the kernel) as a grid; returns when the grid has finished (launches are
// host-synchronous). Errors become the sticky error cudaGetLastError/cudaStreamQuery report.
// Error state read by the CUDA runtime stand-ins (runtime_emu.cpp): a failed kernel makes the
// process's "context" dead (sticky, like a GPU trap); a bad launch configuration is a one-off.
bool sticky_error(std::string* message);
void set_last_launch_error(const std::string& message);
bool take_last_launch_error(std::string* message);
void launch(const char* kernel, const char* file, int line, dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
            std::function<void()> body);

}  // namespace emu
}  // namespace deep_ep

// ------------------------------------------------------------------------------- CUDA built-ins
#define threadIdx (::deep_ep::emu::thread_idx())
#define blockIdx (::deep_ep::emu::block_idx())
#define blockDim (::deep_ep::emu::block_dim())
#define gridDim (::deep_ep::emu::grid_dim())
#define warpSize 32

inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    ::deep_ep::emu::bar_sync(0, -1, file, line);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    ::deep_ep::emu::warp_collective(::deep_ep::emu::CollKind::kSyncWarp, mask, 0, 0, 32, file, line);
}
inline unsigned __ballot_sync(unsigned mask, int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return static_cast<unsigned>(
        ::deep_ep::emu::warp_collective(::deep_ep::emu::CollKind::kBallot, mask, pred != 0, 0, 32, file, line));
}
inline int __any_sync(unsigned mask, int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return static_cast<int>(
        ::deep_ep::emu::warp_collective(::deep_ep::emu::CollKind::kAny, mask, pred != 0, 0, 32, file, line));
}
inline int __all_sync(unsigned mask, int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return static_cast<int>(
        ::deep_ep::emu::warp_collective(::deep_ep::emu::CollKind::kAll, mask, pred != 0, 0, 32, file, line));
}
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32, const char* file = __builtin_FILE(),
                     int line = __builtin_LINE()) {
    using namespace ::deep_ep::emu;
    return from_bits<T>(warp_collective(CollKind::kShfl, mask, to_bits(v), src, width, file, line));
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32, const char* file = __builtin_FILE(),
                         int line = __builtin_LINE()) {
    using namespace ::deep_ep::emu;
    return from_bits<T>(warp_collective(CollKind::kShflXor, mask, to_bits(v), lane_mask, width, file, line));
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32, const char* file = __builtin_FILE(),
                          int line = __builtin_LINE()) {
    using namespace ::deep_ep::emu;
    return from_bits<T>(warp_collective(CollKind::kShflDown, mask, to_bits(v), static_cast<int>(delta), width, file, line));
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32, const char* file = __builtin_FILE(),
                        int line = __builtin_LINE()) {
    using namespace ::deep_ep::emu;
    return from_bits<T>(warp_collective(CollKind::kShflUp, mask, to_bits(v), static_cast<int>(delta), width, file, line));
}

[[noreturn]] inline void __trap(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    ::deep_ep::emu::trap(file, line);
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_system() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

// Atomics: sequentially consistent read-modify-writes on the raw address (relaxed on a GPU; the
// stronger order cannot hide a bug that x86 would not hide anyway).
template <typename T>
inline T atomicAdd(T* p, T v) {
    ::deep_ep::emu::atomic_point();
    return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
inline float atomicAdd(float* p, float v) {
    ::deep_ep::emu::atomic_point();
    float old;
    int cur = __atomic_load_n(reinterpret_cast<int*>(p), __ATOMIC_SEQ_CST);
    while (true) {
        std::memcpy(&old, &cur, 4);
        const float next = old + v;
        int next_bits;
        std::memcpy(&next_bits, &next, 4);
        if (__atomic_compare_exchange_n(reinterpret_cast<int*>(p), &cur, next_bits, false, __ATOMIC_SEQ_CST,
                                        __ATOMIC_SEQ_CST))
            return old;
    }
}
template <typename T>
inline T atomicSub(T* p, T v) {
    ::deep_ep::emu::atomic_point();
    return __atomic_fetch_sub(p, v, __ATOMIC_SEQ_CST);
}
template <typename T>
inline T atomicExch(T* p, T v) {
    ::deep_ep::emu::atomic_point();
    return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST);
}
template <typename T>
inline T atomicMax(T* p, T v) {
    ::deep_ep::emu::atomic_point();
    T cur = __atomic_load_n(p, __ATOMIC_SEQ_CST);
    while (cur < v && !__atomic_compare_exchange_n(p, &cur, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
    }
    return cur;
}
template <typename T>
inline T atomicMin(T* p, T v) {
    ::deep_ep::emu::atomic_point();
    T cur = __atomic_load_n(p, __ATOMIC_SEQ_CST);
    while (cur > v && !__atomic_compare_exchange_n(p, &cur, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
    }
    return cur;
}
template <typename T>
inline T atomicCAS(T* p, T compare, T v) {
    ::deep_ep::emu::atomic_point();
    __atomic_compare_exchange_n(p, &compare, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return compare;
}

// Integer and float intrinsics (round-to-nearest forms are the default IEEE operations on x86-64
// with SSE; the emulated build uses -ffp-contract=off so nothing is fused).
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline float __int_as_float(int x) {
    float f;
    std::memcpy(&f, &x, 4);
    return f;
}
inline int __float_as_int(float f) {
    int x;
    std::memcpy(&x, &f, 4);
    return x;
}
inline unsigned __float_as_uint(float f) {
    unsigned x;
    std::memcpy(&x, &f, 4);
    return x;
}
inline float __uint_as_float(unsigned x) {
    float f;
    std::memcpy(&f, &x, 4);
    return f;
}
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }

template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) {
    using C = std::common_type_t<A, B>;
    return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(a) : static_cast<C>(b);
}
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) {
    using C = std::common_type_t<A, B>;
    return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(b) : static_cast<C>(a);
}
using std::fmaxf;
using std::fminf;
using std::isfinite;
using std::isinf;
using std::isnan;

// Device-side printf goes through the emulator (see device_printf).
#define printf(...) ::deep_ep::emu::device_printf(__VA_ARGS__)

// One launch, for both builds: `DEEP_EP_LAUNCH(kernel, grid, block, smem, stream, args...)`.
#define DEEP_EP_LAUNCH(kernel, grid, block, smem, stream, ...)                                                  \
    ::deep_ep::emu::launch(#kernel, __FILE__, __LINE__, dim3(grid), dim3(block), (smem), (stream),             \
                           [=]() { kernel(__VA_ARGS__); })

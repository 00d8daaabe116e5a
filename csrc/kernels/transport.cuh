// The device-side transport interface the low-latency kernels are written against (ARCHITECTURE.md,
// "Transports inside the CUDA engine"). There is no virtual dispatch on the device: a transport is a
// small struct passed by value and the kernels are templates on its type. Every implementation
// provides exactly these members (checked at compile time by `check_transport` below):
//
//   int rank, num_ranks;                      this PE / rank and the world size
//   char* local(int64_t offset)               this rank's LL buffer at `offset`
//   char* peer_ptr(int pe, int64_t offset)    a load/store pointer to `pe`'s LL buffer at `offset`,
//                                             or nullptr when `pe` is not load/store reachable
//   void put_warp(int pe, int64_t dst_offset, const char* src, int64_t bytes, int lane)
//                                             whole warp: copy `bytes` (multiple of 16) from this
//                                             rank's LL buffer (`src` points into it) to `pe`'s buffer;
//                                             may return before the data is delivered. When `pe` is
//                                             load/store reachable, src and dst must be 16-byte aligned;
//                                             otherwise (network put) any alignment works
//   void complete_warp(int lane)              whole warp: every put_warp this warp issued is delivered
//                                             (or ordered before any later signal of this warp)
//   void signal_set(int pe, int64_t offset, int value)
//                                             one thread: set the int32 word at `offset` in `pe`'s
//                                             buffer, ordered after every put the calling block
//                                             completed before a __syncthreads
//
// Ordering contract used by the kernels (sender): puts by the block's warps -> complete_warp in each
// of those warps -> __syncthreads -> one thread signal_set. Receiver: ld.acquire.sys of the signal in
// its own buffer (ptx::ld_acquire_sys_global), then plain loads of the data.
//
// Implementations: transport_peer.cuh (CUDA IPC pointers) and transport_nvshmem.cuh (NVSHMEM).
#pragma once

#include <cstdint>
#include <type_traits>

namespace deep_ep {
namespace transport {

template <typename T>
struct check_transport {
    static_assert(std::is_trivially_copyable<T>::value, "a transport is passed by value to kernels");
    static_assert(std::is_same<decltype(std::declval<T&>().local(int64_t{})), char*>::value, "local(offset)");
    static_assert(std::is_same<decltype(std::declval<T&>().peer_ptr(0, int64_t{})), char*>::value,
                  "peer_ptr(pe, offset)");
    static constexpr bool value = true;
};

}  // namespace transport
}  // namespace deep_ep

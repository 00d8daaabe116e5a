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
// its own buffer (ptx::ld_acquire_sys_global), then plain loads of the data. (The low-latency kernels.)
//
// 64-bit signal words (the internode kernels' flags: ring tails and heads of the RDMA hop, barrier
// words; docs/internode-cost.md). These never quiet or fence: ordering comes from put-with-signal, and
// the one quiet the protocol needs (before a barrier) is explicit.
//
//   void signal(int pe, int64_t offset, uint64_t value, SignalOp op)
//                                             one thread: SET / ADD `value` to the uint64 word at
//                                             `offset` in `pe`'s buffer. When `pe` is load/store
//                                             reachable it is ordered after every store the block made
//                                             before a __syncthreads (system fence + release); over the
//                                             network it is ordered after nothing: use it only for words
//                                             whose meaning needs no earlier put (heads: the caller's
//                                             reads are done; barrier words after quiet()). Repeated
//                                             signals to one word may land out of order over the
//                                             network, so a word written more than once is ADDed to.
//   void put_signal_warp(int pe, int64_t dst_offset, const char* src, int64_t bytes, int64_t sig_offset,
//                        uint64_t value, SignalOp op, int lane)
//                                             whole warp: copy `bytes` (multiple of 16) from `src` (in
//                                             this rank's buffer) to `pe` at `dst_offset`, then the
//                                             signal; a reader that sees the signal sees the data
//                                             (NVSHMEM put-with-signal: one ordered channel, no quiet).
//                                             `src` may be rewritten once the reader answered (a head).
//   bool test_ge(int64_t offset, uint64_t value)
//                                             one thread: whether this rank's word at `offset` is >=
//                                             `value`; when true, the data its writer's signal ordered
//                                             is visible to this thread (NVSHMEM's test API, which adds
//                                             the consistency step proxy transports need).
//   uint64_t read(int64_t offset)             one thread: the word's value (acquire), e.g. after test_ge
//   void quiet()                              one thread: every network operation this rank issued, by
//                                             any thread or earlier kernel, is complete (nothing to do
//                                             on the load/store path)
//
// Implementations: transport_peer.cuh (CUDA IPC pointers) and transport_nvshmem.cuh (NVSHMEM).
#pragma once

#include <cstdint>
#include <type_traits>

namespace deep_ep {
namespace transport {

// The two NVSHMEM signal operations (NVSHMEM_SIGNAL_SET / NVSHMEM_SIGNAL_ADD).
enum class SignalOp { kSet, kAdd };

template <typename T>
struct check_transport {
    static_assert(std::is_trivially_copyable<T>::value, "a transport is passed by value to kernels");
    static_assert(std::is_same<decltype(std::declval<T&>().local(int64_t{})), char*>::value, "local(offset)");
    static_assert(std::is_same<decltype(std::declval<T&>().peer_ptr(0, int64_t{})), char*>::value,
                  "peer_ptr(pe, offset)");
    static_assert(std::is_same<decltype(std::declval<T&>().test_ge(int64_t{}, uint64_t{})), bool>::value,
                  "test_ge(offset, value)");
    static_assert(std::is_same<decltype(std::declval<T&>().read(int64_t{})), uint64_t>::value, "read(offset)");
    static constexpr bool value = true;
};

}  // namespace transport
}  // namespace deep_ep

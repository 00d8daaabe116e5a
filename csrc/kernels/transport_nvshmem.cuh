// NVSHMEM transport: the public NVSHMEM device API only, so any NVSHMEM transport works (IBGDA,
// IBRC, UCX, libfabric/EFA, P2P). The LL buffer is one symmetric allocation (nvshmem_align), so a
// peer's copy of `offset` is `base + offset` on that PE.
//
//   put_warp      nvshmem_ptr fast path (peer load/store reachable: NVLink, or the same GPU) = warp
//                 stores; otherwise nvshmemx_putmem_nbi_warp (non-blocking, from the symmetric buffer)
//   complete_warp nvshmem_quiet when this warp issued a network put (the P2P path needs nothing)
//   signal_set    P2P: system fence + st.release.sys; network: nvshmem_fence + nvshmem_int_atomic_set
//
// Compiled only into libdeep_ep_nvshmem.so (relocatable device code, device-linked with
// libnvshmem_device). No private IBGDA internals are used.
#pragma once

#include <nvshmem.h>
#include <nvshmemx.h>

#include "ptx.cuh"
#include "transport.cuh"

namespace deep_ep {
namespace transport {

struct NvshmemTransport {
    char* base;  // symmetric address of the LL buffer
    int rank;
    int num_ranks;
    // 0: load/store to every PE nvshmem_ptr reaches. G > 0: only to PEs in this PE's group of G
    // consecutive ranks (its node); the others go through NVSHMEM puts and atomics even when they are
    // P2P-reachable, which runs the network code path on one GPU (tests).
    int p2p_group;

    __device__ __forceinline__ char* local(int64_t offset) const { return base + offset; }
    __device__ __forceinline__ char* peer_ptr(int pe, int64_t offset) const {
        if (p2p_group > 0 && pe / p2p_group != rank / p2p_group) return nullptr;
        return static_cast<char*>(nvshmem_ptr(base + offset, pe));
    }

    __device__ __forceinline__ void put_warp(int pe, int64_t dst_offset, const char* src, int64_t bytes,
                                             int lane) const {
        char* direct = peer_ptr(pe, dst_offset);
        if (direct != nullptr) {
            int4* dst = reinterpret_cast<int4*>(direct);
            const int4* s = reinterpret_cast<const int4*>(src);
            const int64_t n = bytes / 16;
            for (int64_t i = lane; i < n; i += 32) dst[i] = ptx::ld_na_global_v4(s + i);
        } else {
            nvshmemx_putmem_nbi_warp(base + dst_offset, src, static_cast<size_t>(bytes), pe);
        }
    }

    __device__ __forceinline__ void complete_warp(int lane) const {
        __syncwarp();
        // Network puts must be delivered before the block's signal; quiet is cheap when nothing is
        // outstanding, and it is what the public API offers to order another thread's later signal.
        if (lane == 0) nvshmem_quiet();
        __syncwarp();
    }

    __device__ __forceinline__ void signal_set(int pe, int64_t offset, int value) const {
        char* direct = peer_ptr(pe, offset);
        if (direct != nullptr) {
            __threadfence_system();
            ptx::st_release_sys_global(reinterpret_cast<int*>(direct), value);
        } else {
            nvshmem_fence();
            nvshmem_int_atomic_set(reinterpret_cast<int*>(base + offset), value, pe);
        }
    }
};

static_assert(check_transport<NvshmemTransport>::value, "NvshmemTransport");

}  // namespace transport
}  // namespace deep_ep

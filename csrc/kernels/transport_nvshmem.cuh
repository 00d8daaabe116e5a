// NVSHMEM transport: the public NVSHMEM device API only, so any NVSHMEM transport works (IBGDA,
// IBRC, UCX, libfabric/EFA, P2P). The LL buffer is one symmetric allocation (nvshmem_align), so a
// peer's copy of `offset` is `base + offset` on that PE.
//
//   put_warp      nvshmem_ptr fast path (peer load/store reachable: NVLink, or the same GPU) = warp
//                 stores; otherwise nvshmemx_putmem_nbi_warp (non-blocking, from the symmetric buffer)
//   complete_warp nvshmem_quiet when this warp issued a network put (the P2P path needs nothing)
//   signal_set    P2P: system fence + st.release.sys; network: nvshmem_fence + nvshmem_int_atomic_set
//                 (the three above: the low-latency kernels only)
//
// 64-bit signal words (the internode kernels; transport.cuh):
//   signal          P2P: system fence + st.release / red.add.release (u64); network: nvshmemx_signal_op
//                   (NVSHMEM_SIGNAL_SET / ADD) and nothing else: no fence, no quiet
//   put_signal_warp P2P: warp copy + signal; network: nvshmemx_putmem_signal_nbi_warp (the signal is
//                   delivered after the data, on the same ordered channel)
//   test_ge / read  nvshmem_uint64_test(NVSHMEM_CMP_GE) then an acquire load: the test is NVSHMEM's
//                   wait API in non-blocking form, so the kernels keep their own bounded wait (the
//                   device-side timeout naming rank / channel / peer) while NVSHMEM adds, once the
//                   condition holds, the consistency step proxy transports (IBRC, UCX, libfabric) need
//                   for data a NIC wrote before the proxy wrote the flag. On IBGDA / P2P it is a
//                   load, a compare and a __threadfence.
//   quiet           nvshmem_quiet once, by one thread, and only when some PE is reached through the
//                   network (on IBGDA it visits every QP of the PE: the kernels call it once per barrier)
//
// Every network flag is a 64-bit signal operation, which NVSHMEM implements natively on every remote
// transport, IBRC without GDRCopy included (other atomics there need GDRCopy: "RMA/AMO verb not
// implemented"). The low-latency kernels still use nvshmem_int_atomic_set (signal_set above).
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

    // ---- 64-bit signal words (transport.cuh)
    static __device__ __forceinline__ int nvshmem_signal_op_of(SignalOp op) {
        return op == SignalOp::kSet ? NVSHMEM_SIGNAL_SET : NVSHMEM_SIGNAL_ADD;
    }

    __device__ __forceinline__ void signal(int pe, int64_t offset, uint64_t value, SignalOp op) const {
        char* direct = peer_ptr(pe, offset);
        if (direct != nullptr) {
            __threadfence_system();
            uint64_t* word = reinterpret_cast<uint64_t*>(direct);
            if (op == SignalOp::kSet)
                ptx::st_release_sys_global(word, value);
            else
                ptx::red_add_release_sys_global(word, value);
        } else {
            nvshmemx_signal_op(reinterpret_cast<uint64_t*>(base + offset), value, nvshmem_signal_op_of(op), pe);
        }
    }

    __device__ __forceinline__ void put_signal_warp(int pe, int64_t dst_offset, const char* src, int64_t bytes,
                                                    int64_t sig_offset, uint64_t value, SignalOp op, int lane) const {
        if (peer_ptr(pe, dst_offset) != nullptr) {
            put_warp(pe, dst_offset, src, bytes, lane);
            __syncwarp();
            if (lane == 0) signal(pe, sig_offset, value, op);
            __syncwarp();
        } else {
            nvshmemx_putmem_signal_nbi_warp(base + dst_offset, src, static_cast<size_t>(bytes),
                                            reinterpret_cast<uint64_t*>(base + sig_offset), value,
                                            nvshmem_signal_op_of(op), pe);
        }
    }

    __device__ __forceinline__ bool test_ge(int64_t offset, uint64_t value) const {
        return nvshmem_uint64_test(reinterpret_cast<uint64_t*>(base + offset), NVSHMEM_CMP_GE, value) != 0;
    }

    __device__ __forceinline__ uint64_t read(int64_t offset) const {
        return ptx::ld_acquire_sys_global(reinterpret_cast<const uint64_t*>(base + offset));
    }

    __device__ __forceinline__ void quiet() const {
        for (int pe = 0; pe < num_ranks; ++pe) {
            if (peer_ptr(pe, 0) == nullptr) {
                nvshmem_quiet();
                return;
            }
        }
    }
};

static_assert(check_transport<NvshmemTransport>::value, "NvshmemTransport");

}  // namespace transport
}  // namespace deep_ep

// Peer-memory transport: every rank maps every other rank's LL buffer (CUDA IPC across processes,
// the raw pointer inside one process; Runtime::open_peers), so a put is a warp copy with plain 16-byte
// stores into the peer's memory and a signal is a system-scope release store. Used for ranks of one
// NVLink domain (and for several ranks sharing one GPU, the test set-up).
#pragma once

#include "config.cuh"
#include "ptx.cuh"
#include "transport.cuh"

namespace deep_ep {
namespace transport {

struct PeerTransport {
    char* base[kMaxNvlRanks];  // base[r]: rank r's LL buffer as mapped in this process
    int rank;
    int num_ranks;

    __device__ __forceinline__ char* local(int64_t offset) const { return base[rank] + offset; }
    __device__ __forceinline__ char* peer_ptr(int pe, int64_t offset) const { return base[pe] + offset; }

    __device__ __forceinline__ void put_warp(int pe, int64_t dst_offset, const char* src, int64_t bytes,
                                             int lane) const {
        int4* dst = reinterpret_cast<int4*>(base[pe] + dst_offset);
        const int4* s = reinterpret_cast<const int4*>(src);
        const int64_t n = bytes / 16;
        for (int64_t i = lane; i < n; i += 32) dst[i] = ptx::ld_na_global_v4(s + i);
    }

    // Plain stores are ordered by the block barrier + the system fence in signal_set.
    __device__ __forceinline__ void complete_warp(int) const { __syncwarp(); }

    __device__ __forceinline__ void signal_set(int pe, int64_t offset, int value) const {
        __threadfence_system();  // the block's stores (made visible to this thread by __syncthreads)
        ptx::st_release_sys_global(reinterpret_cast<int*>(base[pe] + offset), value);
    }

    // ---- 64-bit signal words (transport.cuh)
    __device__ __forceinline__ void signal(int pe, int64_t offset, uint64_t value, SignalOp op) const {
        __threadfence_system();  // the block's stores (made visible to this thread by __syncthreads)
        uint64_t* word = reinterpret_cast<uint64_t*>(base[pe] + offset);
        if (op == SignalOp::kSet)
            ptx::st_release_sys_global(word, value);
        else
            ptx::red_add_release_sys_global(word, value);
    }

    __device__ __forceinline__ void put_signal_warp(int pe, int64_t dst_offset, const char* src, int64_t bytes,
                                                    int64_t sig_offset, uint64_t value, SignalOp op, int lane) const {
        put_warp(pe, dst_offset, src, bytes, lane);
        __syncwarp();
        if (lane == 0) signal(pe, sig_offset, value, op);
        __syncwarp();
    }

    __device__ __forceinline__ bool test_ge(int64_t offset, uint64_t value) const { return read(offset) >= value; }

    __device__ __forceinline__ uint64_t read(int64_t offset) const {
        return ptx::ld_acquire_sys_global(reinterpret_cast<const uint64_t*>(base[rank] + offset));
    }

    __device__ __forceinline__ void quiet() const {}
};

static_assert(check_transport<PeerTransport>::value, "PeerTransport");

}  // namespace transport
}  // namespace deep_ep

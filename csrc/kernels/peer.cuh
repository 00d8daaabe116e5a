// Peer memory, the intranode transport: every rank of the NVLink domain maps every other rank's
// NVLink buffer (CUDA IPC across processes, the raw pointer inside one process), so a peer is
// reached with ordinary loads and stores plus system-scope release/acquire on flags.
#pragma once

#include "config.cuh"
#include "ptx.cuh"
#include "utils.cuh"

namespace deep_ep {

// Passed by value to every intranode kernel (2 * 8 pointers: no device-side pointer tables).
struct PeerBuffers {
    void* data[kMaxNvlRanks];     // each rank's NVLink data region; data[rank] is this rank's own
    int* barrier[kMaxNvlRanks];   // each rank's barrier signals (kMaxNvlRanks ints)
};

// Barrier of all ranks, called by every thread of one block.
//
// Slot barrier[me][t] receives +1 from me and -1 from rank t (each when it arrives), so it returns
// to 0 once both have arrived, whichever came first; a rank waits until all its slots are <= 0. A
// peer can run at most one barrier ahead (it cannot leave the next one before this rank arrives),
// which leaves the slot at -1 and still lets this rank through: no reset is ever needed.
//
// Ordering: __syncthreads + the system fence make the whole block's earlier writes (metadata written
// into peers, zeroed ring counters) visible before the release-add that signals arrival; the acquire
// load that sees the peer's signal pairs with the peer's release-add, so the block's later reads see
// the peer's writes.
__device__ __forceinline__ void barrier_all_ranks(const PeerBuffers& peers, int rank, int num_ranks,
                                                  uint64_t timeout_ns, const char* kernel) {
    __syncthreads();
    const int t = threadIdx.x;
    if (t < num_ranks) {
        __threadfence_system();
        ptx::red_add_release_sys_global(peers.barrier[rank] + t, 1);   // pairs with rank t's acquire below
        ptx::red_add_release_sys_global(peers.barrier[t] + rank, -1);  // pairs with rank t's acquire
        SpinWait wait(timeout_ns);
        int value;
        while ((value = ptx::ld_acquire_sys_global(peers.barrier[rank] + t)) > 0) {
            if (wait.expired()) report_timeout_and_trap(kernel, WaitRole::kBarrier, rank, -1, t, 0, value);
        }
    }
    __syncthreads();
}

}  // namespace deep_ep

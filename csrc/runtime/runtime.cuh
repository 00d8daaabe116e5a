// The per-Buffer runtime of one rank: its NVLink buffer (cudaMalloc + CUDA IPC), the mapped peer
// buffers, the host-mapped counters the CPU polls, and the timeout every wait uses.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../kernels/config.cuh"
#include "../kernels/peer.cuh"

namespace deep_ep {

// Makes `device` current for a scope and restores the previous device.
class DeviceGuard {
   public:
    explicit DeviceGuard(int device);
    ~DeviceGuard();
    DeviceGuard(const DeviceGuard&) = delete;
    DeviceGuard& operator=(const DeviceGuard&) = delete;

   private:
    int previous_ = -1;
    bool changed_ = false;
};

class Runtime {
   public:
    // Allocation of one rank (every rank has the same):
    //   [0, num_nvl_bytes)                                  data region (IntranodeLayout, user-visible)
    //   [num_nvl_bytes, num_nvl_bytes + kBarrierSignalBytes)  barrier signals, int per peer
    Runtime(int rank, int num_ranks, int device, int64_t num_nvl_bytes, double timeout_s);
    ~Runtime();
    Runtime(const Runtime&) = delete;
    Runtime& operator=(const Runtime&) = delete;

    void ipc_handle(cudaIpcMemHandle_t* out) const;
    void* data() const { return base_; }
    void open_peers(const cudaIpcMemHandle_t* handles, const uint64_t* ptrs, const int* same_process);
    const PeerBuffers& peers() const;

    int rank() const { return rank_; }
    int num_ranks() const { return num_ranks_; }
    int device() const { return device_; }
    int64_t num_nvl_bytes() const { return num_nvl_bytes_; }
    uint64_t timeout_ns() const { return timeout_ns_; }
    int* device_counters() const { return device_counters_; }

    // Host side of the CPU sync: -1 into the counters before a notify, then poll them.
    void reset_recv_counters(int num_local_experts);
    // 0: arrived; 1: timed out (values hold what was seen).
    int wait_recv_counters(cudaStream_t stream, int num_local_experts, int* values) const;
    int take_worst_overflow();
    // One host-mapped counter as the CPU sees it now (config.cuh lists them).
    int host_counter(int index) const;

    // Checks that a kernel of 2 * num_channels blocks fits on the device at once.
    void check_grid(int num_channels, bool combine_kernel) const;

   private:
    int rank_, num_ranks_, device_;
    int64_t num_nvl_bytes_;
    uint64_t timeout_ns_;
    double timeout_s_;
    void* base_ = nullptr;
    bool peers_open_ = false;
    bool ipc_opened_[kMaxNvlRanks] = {};
    PeerBuffers peers_ = {};
    int* host_counters_ = nullptr;    // pinned, mapped
    int* device_counters_ = nullptr;  // its device alias
    int num_sms_ = 0;
    mutable int dispatch_blocks_per_sm_ = -1;  // occupancy, computed on first use
    mutable int combine_blocks_per_sm_ = -1;
};

}  // namespace deep_ep

#include "runtime.cuh"

#include <chrono>
#include <cstring>
#include <string>
#include <thread>

#include "../kernels/api.cuh"
#include "../kernels/exception.cuh"

namespace deep_ep {

DeviceGuard::DeviceGuard(int device) {
    if (cudaGetDevice(&previous_) != cudaSuccess) previous_ = -1;
    if (previous_ != device) {
        DEEP_EP_CUDA_CHECK(cudaSetDevice(device));
        changed_ = true;
    }
}

DeviceGuard::~DeviceGuard() {
    if (changed_ && previous_ >= 0) cudaSetDevice(previous_);
}

Runtime::Runtime(int rank, int num_ranks, int device, int64_t num_nvl_bytes, double timeout_s)
    : rank_(rank), num_ranks_(num_ranks), device_(device), num_nvl_bytes_(num_nvl_bytes),
      timeout_ns_(static_cast<uint64_t>(timeout_s * 1e9)), timeout_s_(timeout_s) {
    host_check(num_ranks >= 1 && num_ranks <= kMaxNvlRanks,
               "deep_ep runtime: the CUDA engine handles 1.." + std::to_string(kMaxNvlRanks) +
                   " ranks in one NVLink domain, got " + std::to_string(num_ranks));
    host_check(rank >= 0 && rank < num_ranks, "deep_ep runtime: bad rank " + std::to_string(rank));
    host_check(num_nvl_bytes > 0 && num_nvl_bytes % kRegionAlignBytes == 0,
               "deep_ep runtime: num_nvl_bytes must be a positive multiple of 128, got " +
                   std::to_string(num_nvl_bytes));
    host_check(timeout_s > 0, "deep_ep runtime: timeout must be positive");
    DeviceGuard guard(device);
    DEEP_EP_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms_, cudaDevAttrMultiProcessorCount, device));
    DEEP_EP_CUDA_CHECK(cudaMalloc(&base_, num_nvl_bytes + kBarrierSignalBytes));
    // Zero everything (the barrier signals must start at 0) and finish before the IPC handle is
    // handed out: peers may touch the memory as soon as they opened it.
    DEEP_EP_CUDA_CHECK(cudaMemset(base_, 0, num_nvl_bytes + kBarrierSignalBytes));
    DEEP_EP_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&host_counters_), sizeof(int) * kNumHostCounters,
                                     cudaHostAllocMapped));
    DEEP_EP_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&device_counters_), host_counters_, 0));
    for (int i = 0; i < kNumHostCounters; ++i) host_counters_[i] = -1;
    host_counters_[kCounterWorstOverflow] = 0;
    DEEP_EP_CUDA_CHECK(cudaDeviceSynchronize());
}

Runtime::~Runtime() {
    // Errors here cannot be reported (destructor); a failing free leaks at worst.
    if (cudaSetDevice(device_) != cudaSuccess) return;
    cudaDeviceSynchronize();
    for (int i = 0; i < kMaxNvlRanks; ++i) {
        if (ipc_opened_[i]) cudaIpcCloseMemHandle(peers_.data[i]);
    }
    if (base_ != nullptr) cudaFree(base_);
    if (host_counters_ != nullptr) cudaFreeHost(host_counters_);
}

void Runtime::ipc_handle(cudaIpcMemHandle_t* out) const {
    DeviceGuard guard(device_);
    DEEP_EP_CUDA_CHECK(cudaIpcGetMemHandle(out, base_));
}

void Runtime::open_peers(const cudaIpcMemHandle_t* handles, const uint64_t* ptrs, const int* same_process) {
    host_check(!peers_open_, "deep_ep runtime: peers are already open");
    DeviceGuard guard(device_);
    for (int i = 0; i < num_ranks_; ++i) {
        void* peer = nullptr;
        if (i == rank_) {
            peer = base_;
        } else if (same_process[i] != 0) {
            // Same address space: use the pointer; enable peer access when it lives on another GPU.
            peer = reinterpret_cast<void*>(ptrs[i]);
            cudaPointerAttributes attr;
            DEEP_EP_CUDA_CHECK(cudaPointerGetAttributes(&attr, peer));
            if (attr.device != device_) {
                const cudaError_t err = cudaDeviceEnablePeerAccess(attr.device, 0);
                if (err == cudaErrorPeerAccessAlreadyEnabled) {
                    cudaGetLastError();  // clear the non-sticky error
                } else if (err != cudaSuccess) {
                    throw_cuda_error(err, "cudaDeviceEnablePeerAccess", __FILE__, __LINE__);
                }
            }
        } else {
            // Another process (possibly on this same GPU): map its allocation.
            const cudaError_t err = cudaIpcOpenMemHandle(&peer, handles[i], cudaIpcMemLazyEnablePeerAccess);
            if (err != cudaSuccess) {
                throw Error("deep_ep runtime: rank " + std::to_string(rank_) + " cannot open the CUDA IPC handle of rank " +
                            std::to_string(i) + ": " + cuda_error_text(err));
            }
            ipc_opened_[i] = true;
        }
        peers_.data[i] = peer;
        peers_.barrier[i] = reinterpret_cast<int*>(static_cast<char*>(peer) + num_nvl_bytes_);
    }
    peers_open_ = true;
}

const PeerBuffers& Runtime::peers() const {
    host_check(peers_open_, "deep_ep runtime: peers are not open yet (deep_ep_runtime_open_peers)");
    return peers_;
}

void Runtime::reset_recv_counters(int num_local_experts) {
    host_check(num_local_experts >= 0 && num_local_experts <= kMaxLocalExperts,
               "deep_ep runtime: at most " + std::to_string(kMaxLocalExperts) + " experts per rank, got " +
                   std::to_string(num_local_experts));
    volatile int* counters = host_counters_;
    counters[kCounterRecvTokens] = -1;
    counters[kCounterRdmaRecvTokens] = -1;
    for (int j = 0; j < num_local_experts; ++j) counters[kCounterExperts + j] = -1;
}

int Runtime::host_counter(int index) const {
    host_check(index >= 0 && index < kNumHostCounters, "deep_ep runtime: bad host counter index " + std::to_string(index));
    const volatile int* counters = host_counters_;
    return counters[index];
}

int Runtime::wait_recv_counters(cudaStream_t stream, int num_local_experts, int* values) const {
    const volatile int* counters = host_counters_;
    const auto start = std::chrono::steady_clock::now();
    const auto limit = std::chrono::duration<double>(timeout_s_);
    auto next_stream_check = start;
    while (true) {
        bool ready = counters[kCounterRecvTokens] >= 0;
        for (int j = 0; ready && j < num_local_experts; ++j) ready = counters[kCounterExperts + j] >= 0;
        const auto now = std::chrono::steady_clock::now();
        if (ready || now - start > limit) {
            values[0] = counters[kCounterRecvTokens];
            for (int j = 0; j < num_local_experts; ++j) values[1 + j] = counters[kCounterExperts + j];
            return ready ? 0 : 1;
        }
        // A kernel that trapped (a device-side timeout) never writes the counters: surface its
        // error instead of waiting out the timeout.
        if (now >= next_stream_check) {
            DeviceGuard guard(device_);
            const cudaError_t err = cudaStreamQuery(stream);
            if (err != cudaSuccess && err != cudaErrorNotReady)
                throw Error("deep_ep: the dispatch notify kernel failed while the CPU waited for the receive counts: " +
                            cuda_error_text(err));
            next_stream_check = now + std::chrono::milliseconds(10);
        }
        std::this_thread::yield();
    }
}

int Runtime::take_worst_overflow() {
    volatile int* counters = host_counters_;
    const int value = counters[kCounterWorstOverflow];
    if (value != 0) counters[kCounterWorstOverflow] = 0;
    return value;
}

void Runtime::check_grid(int num_channels, bool combine_kernel) const {
    int& cached = combine_kernel ? combine_blocks_per_sm_ : dispatch_blocks_per_sm_;
    if (cached < 0) {
        DeviceGuard guard(device_);
        cached = combine_kernel ? intranode::combine_max_blocks_per_sm() : intranode::dispatch_max_blocks_per_sm();
    }
    const int per_sm = cached;
    const int64_t fits = static_cast<int64_t>(per_sm) * num_sms_;
    host_check(2 * static_cast<int64_t>(num_channels) <= fits,
               std::string("deep_ep: the intranode ") + (combine_kernel ? "combine" : "dispatch") + " kernel needs " +
                   std::to_string(2 * num_channels) + " blocks (Config.num_sms) resident at once, but this GPU fits " +
                   std::to_string(fits) + " (" + std::to_string(num_sms_) + " SMs x " + std::to_string(per_sm) +
                   "); use a smaller num_sms");
}

}  // namespace deep_ep

// libdeep_ep_nvshmem.so: the NVSHMEM bootstrap (unique id, init, symmetric LL buffer) and the LL send
// kernels over the NVSHMEM transport (transport_nvshmem.cuh). Built by build_core.py only when NVSHMEM
// is found: relocatable device code, device-linked against libnvshmem_device.a, host side linked
// against libnvshmem_host.so.3 by SONAME (Python loads that library from the wheel or NVSHMEM_DIR
// before this one: deep_ep/_core.py). The prepare and receive kernels are transport-free and live
// in libdeep_ep_core.so; both libraries enqueue on the same stream.
//
// NVSHMEM is initialised here, in the library that holds the device code, because
// nvshmemi_init_thread (in libnvshmem_device.a) also sets up this module's device state.
#include <cuda_runtime.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#include <cstring>
#include <exception>
#include <string>

#include "../capi_guard.h"
#include "../deep_ep_ll.h"
#include "../kernels/exception.cuh"
#include "../deep_ep_internode.h"
#include "../kernels/internode.cuh"
#include "../kernels/low_latency_send.cuh"
#include "../kernels/transport_nvshmem.cuh"

namespace {

thread_local std::string g_last_error;
bool g_initialised = false;
int g_users = 0;  // Buffers sharing this process's NVSHMEM world (init once, finalize with the last)

// This library's static CUDA runtime keeps its own current device per thread: run `body` with `device`
// current, then restore the previous one.
template <typename F>
void on_device(int device, F&& body) {
    int previous = -1;
    DEEP_EP_CUDA_CHECK(cudaGetDevice(&previous));
    if (previous != device) DEEP_EP_CUDA_CHECK(cudaSetDevice(device));
    try {
        body();
    } catch (...) {
        if (previous != device) cudaSetDevice(previous);
        throw;
    }
    if (previous != device) DEEP_EP_CUDA_CHECK(cudaSetDevice(previous));
}

template <typename F>
int guarded(F&& body) {
    return deep_ep::capi_guarded(g_last_error, "deep_ep nvshmem", [&] {
        deep_ep::clear_stale_cuda_error();  // an error this entry point reports is its own
        std::forward<F>(body)();
    });
}

void require_init(const char* what) {
    deep_ep::host_check(g_initialised, std::string("deep_ep nvshmem: ") + what + " before deep_ep_nvshmem_init");
}

}  // namespace

extern "C" {

int deep_ep_nvshmem_abi_version(void) { return 1; }

const char* deep_ep_nvshmem_last_error(void) { return g_last_error.c_str(); }

int deep_ep_nvshmem_call_bytes(void) { return static_cast<int>(sizeof(deep_ep_ll_call)); }

int deep_ep_nvshmem_uniqueid_bytes(void) { return static_cast<int>(sizeof(nvshmemx_uniqueid_t)); }

int deep_ep_nvshmem_get_uniqueid(void* out) {
    return guarded([&] {
        nvshmemx_uniqueid_t id = NVSHMEMX_UNIQUEID_INITIALIZER;
        deep_ep::host_check(nvshmemx_get_uniqueid(&id) == 0, "deep_ep nvshmem: nvshmemx_get_uniqueid failed");
        std::memcpy(out, &id, sizeof(id));
    });
}

int deep_ep_nvshmem_init(const void* uniqueid, int rank, int num_ranks, int device) {
    return guarded([&] {
        if (g_initialised) {  // another Buffer of this process already joined the same world
            deep_ep::host_check(nvshmem_my_pe() == rank && nvshmem_n_pes() == num_ranks,
                                "deep_ep nvshmem: NVSHMEM is already initialised in this process with PE " +
                                    std::to_string(nvshmem_my_pe()) + " of " + std::to_string(nvshmem_n_pes()) +
                                    "; a Buffer over another group cannot use NVSHMEM in the same process");
            ++g_users;
            return;
        }
        DEEP_EP_CUDA_CHECK(cudaSetDevice(device));
        nvshmemx_uniqueid_t id;
        std::memcpy(&id, uniqueid, sizeof(id));
        nvshmemx_init_attr_t attr = NVSHMEMX_INIT_ATTR_INITIALIZER;
        deep_ep::host_check(nvshmemx_set_attr_uniqueid_args(rank, num_ranks, &id, &attr) == 0,
                            "deep_ep nvshmem: nvshmemx_set_attr_uniqueid_args failed");
        // nvshmemx_init_attr without its exit(-1) on failure: the same call, the status returned.
        nvshmemi_version_t version = {NVSHMEM_VENDOR_MAJOR_VERSION, NVSHMEM_VENDOR_MINOR_VERSION,
                                      NVSHMEM_VENDOR_PATCH_VERSION};
        nvshmemx_init_init_attr_ver_only(attr);
        int provided = 0;
        const int status = nvshmemi_init_thread(NVSHMEM_THREAD_SERIALIZED, &provided, NVSHMEMX_INIT_WITH_UNIQUEID,
                                                &attr, version);
        deep_ep::host_check(status == 0, "deep_ep nvshmem: NVSHMEM initialisation (UID bootstrap) failed with status " +
                                             std::to_string(status) + " on rank " + std::to_string(rank) +
                                             "; NVSHMEM_DEBUG=INFO tells why (see deep_ep._nvshmem for the environment)");
        deep_ep::host_check(nvshmem_my_pe() == rank && nvshmem_n_pes() == num_ranks,
                            "deep_ep nvshmem: PE numbering does not match the group's ranks");
        g_initialised = true;
        g_users = 1;
    });
}

int deep_ep_nvshmem_alloc(int64_t bytes, uint64_t* ptr) {
    return guarded([&] {
        require_init("alloc");
        deep_ep::host_check(bytes > 0 && bytes % 128 == 0, "deep_ep nvshmem: the LL buffer size must be a positive multiple of 128");
        void* p = nvshmem_align(128, static_cast<size_t>(bytes));
        deep_ep::host_check(p != nullptr, "deep_ep nvshmem: nvshmem_align(" + std::to_string(bytes) +
                                              ") failed: raise NVSHMEM_SYMMETRIC_SIZE");
        DEEP_EP_CUDA_CHECK(cudaMemset(p, 0, static_cast<size_t>(bytes)));
        DEEP_EP_CUDA_CHECK(cudaDeviceSynchronize());
        nvshmem_barrier_all();
        *ptr = reinterpret_cast<uint64_t>(p);
    });
}

int deep_ep_nvshmem_free(uint64_t ptr) {
    return guarded([&] {
        require_init("free");
        DEEP_EP_CUDA_CHECK(cudaDeviceSynchronize());
        nvshmem_barrier_all();
        nvshmem_free(reinterpret_cast<void*>(ptr));
    });
}

int deep_ep_nvshmem_barrier(void) {
    return guarded([&] {
        require_init("barrier");
        nvshmem_barrier_all();
    });
}

int deep_ep_nvshmem_finalize(void) {
    return guarded([&] {
        if (!g_initialised || --g_users > 0) return;
        nvshmem_finalize();
        g_initialised = false;
    });
}

int deep_ep_nvshmem_info(int* status, int* my_pe, int* n_pes) {
    return guarded([&] {
        *status = nvshmemx_init_status();
        *my_pe = g_initialised ? nvshmem_my_pe() : -1;
        *n_pes = g_initialised ? nvshmem_n_pes() : -1;
    });
}

int deep_ep_nvshmem_ll_send(const deep_ep_ll_call* call, uint64_t stream) {
    return guarded([&] {
        require_init("ll_send");
        deep_ep::host_check(call != nullptr, "deep_ep_nvshmem_ll_send: null call");
        deep_ep::host_check(call->num_ranks == nvshmem_n_pes() && call->rank == nvshmem_my_pe(),
                            "deep_ep_nvshmem_ll_send: the call's ranks do not match the NVSHMEM world");
        deep_ep::transport::NvshmemTransport tr{};
        tr.base = static_cast<char*>(call->buffer);
        tr.rank = call->rank;
        tr.num_ranks = call->num_ranks;
        deep_ep::ll::check_call(*call);  // argument errors before any CUDA call
        on_device(call->device, [&] { deep_ep::ll::launch_send(*call, tr, reinterpret_cast<cudaStream_t>(stream)); });
    });
}

// The internode (two-hop) kernels with the RDMA hop over NVSHMEM. The caller fills
// call->rdma_local (this PE's symmetric internode region, the same offset on every PE), nvl_peers
// (the node's NVL regions, CUDA IPC through libdeep_ep_core.so), host_counters and timeout_ns.
int deep_ep_nvshmem_internode_call_bytes(void) { return static_cast<int>(sizeof(deep_ep_internode_call)); }

int deep_ep_nvshmem_internode_launch(const void* raw_call, uint64_t stream) {
    return guarded([&] {
        const auto* call = static_cast<const deep_ep_internode_call*>(raw_call);
        require_init("internode_launch");
        deep_ep::host_check(call != nullptr, "deep_ep_nvshmem_internode_launch: null call");
        deep_ep::host_check(call->num_ranks == nvshmem_n_pes() && call->rank == nvshmem_my_pe(),
                            "deep_ep_nvshmem_internode_launch: the call's ranks do not match the NVSHMEM world");
        deep_ep::host_check(call->rdma_local != nullptr && call->host_counters != nullptr,
                            "deep_ep_nvshmem_internode_launch: rdma_local / host_counters not set");
        for (int j = 0; j < call->num_ranks_per_node && j < DEEP_EP_INTERNODE_MAX_PEERS; ++j)
            deep_ep::host_check(call->nvl_peers[j] != nullptr, "deep_ep_nvshmem_internode_launch: nvl_peers not set");
        deep_ep::transport::NvshmemTransport tr{};
        tr.base = static_cast<char*>(call->rdma_local);
        tr.rank = call->rank;
        tr.num_ranks = call->num_ranks;
        tr.p2p_group = call->nvshmem_p2p_group;
        on_device(call->device, [&] { deep_ep::internode::launch(*call, tr, reinterpret_cast<cudaStream_t>(stream)); });
    });
}

}  // extern "C"

// The C ABI (deep_ep_core.h): argument checks that need the runtime, layout sizing, and calls into
// the launchers. Every entry point catches exceptions and turns them into -1 + a message.
#include "capi_guard.h"
#include "deep_ep_core.h"
#include "deep_ep_internode.h"

#include <cuda_runtime.h>

#include <cmath>
#include <cstring>
#include <exception>
#include <string>

#include "kernels/api.cuh"
#include "kernels/buffer_layout.cuh"
#include "kernels/config.cuh"
#include "kernels/exception.cuh"
#include "kernels/internode.cuh"
#include "runtime/runtime.cuh"

namespace {

thread_local std::string g_last_error;

template <typename F>
int guarded(F&& body) {
    return deep_ep::capi_guarded(g_last_error, "deep_ep core", [&] {
        deep_ep::clear_stale_cuda_error();  // an error this entry point reports is its own
        std::forward<F>(body)();
    });
}

deep_ep::Runtime* as_runtime(void* rt) {
    deep_ep::host_check(rt != nullptr, "deep_ep core: null runtime");
    return static_cast<deep_ep::Runtime*>(rt);
}

cudaStream_t as_stream(uint64_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

deep_ep::IntranodeLayout make_layout(int num_ranks, int num_channels, int num_slots, int num_experts,
                                     int64_t row_bytes, int num_topk, int num_scales, bool is_combine) {
    using deep_ep::host_check;
    host_check(num_ranks >= 1 && num_ranks <= deep_ep::kMaxNvlRanks, "deep_ep: bad num_ranks " + std::to_string(num_ranks));
    host_check(num_channels >= 1 && num_channels <= deep_ep::kMaxChannels,
               "deep_ep: the number of channels (Config.num_sms / 2) must be in [1, " +
                   std::to_string(deep_ep::kMaxChannels) + "], got " + std::to_string(num_channels));
    host_check(num_slots >= 1, "deep_ep: num_max_nvl_chunked_recv_tokens must be >= 1");
    host_check(row_bytes > 0 && row_bytes % 16 == 0,
               "deep_ep: hidden * element size must be a positive multiple of 16 bytes, got " + std::to_string(row_bytes));
    host_check(num_topk >= 0 && num_topk <= deep_ep::kMaxTopK,
               "deep_ep: num_topk must be in [0, " + std::to_string(deep_ep::kMaxTopK) + "], got " + std::to_string(num_topk));
    host_check(num_scales >= 0, "deep_ep: bad num_scales");
    host_check(num_experts >= 0 && num_experts % num_ranks == 0, "deep_ep: num_experts must be a multiple of num_ranks");
    const deep_ep::IntranodeLayout layout =
        is_combine ? deep_ep::combine_layout(num_ranks, num_channels, num_slots, row_bytes, num_topk)
                   : deep_ep::dispatch_layout(num_ranks, num_channels, num_slots, num_experts / num_ranks, row_bytes,
                                              num_topk, num_scales);
    // The combine reducer indexes ring rows with 32-bit int4 offsets.
    host_check(layout.region_bytes(deep_ep::IntranodeLayout::kX) / 16 < INT32_MAX,
               "deep_ep: the ring buffers would exceed 32 GiB; use fewer channels or a smaller ring");
    return layout;
}

void check_fits(const deep_ep::Runtime& rt, const deep_ep::IntranodeLayout& layout, const char* what) {
    const int64_t needed = layout.total_bytes();
    deep_ep::host_check(needed <= rt.num_nvl_bytes(),
                        std::string("deep_ep: the intranode ") + what + " needs " + std::to_string(needed) +
                            " bytes of NVLink buffer, but the Buffer has num_nvl_bytes=" +
                            std::to_string(rt.num_nvl_bytes()) +
                            "; allocate more (Config.get_nvl_buffer_size_hint gives an upper bound) or use a config "
                            "with fewer SMs / smaller num_max_nvl_chunked_recv_tokens");
}

}  // namespace

extern "C" {

int deep_ep_core_abi_version(void) { return DEEP_EP_CORE_ABI_VERSION; }

int deep_ep_core_is_sm90(void) {
#ifdef DEEP_EP_DISABLE_SM90_FEATURES
    return 0;
#else
    return 1;
#endif
}

int deep_ep_core_has_nvshmem(void) {
#ifdef DEEP_EP_HAS_NVSHMEM
    return 1;
#else
    return 0;
#endif
}

const char* deep_ep_core_last_error(void) { return g_last_error.c_str(); }

int deep_ep_core_limits(int* limits, int num_limits) {
    const int values[] = {deep_ep::kMaxNvlRanks, deep_ep::kMaxChannels, deep_ep::kMaxTopK,
                          deep_ep::kMaxLocalExperts, deep_ep::kNumIntranodeThreads, deep_ep::kNumHostCounters,
                          deep_ep::kMaxInternodeNodes};
    const int n = static_cast<int>(sizeof(values) / sizeof(values[0]));
    for (int i = 0; i < num_limits && i < n; ++i) limits[i] = values[i];
    return 0;
}

int deep_ep_core_host_replay_launch_check(const int* script, int n) {
    static thread_local const int* t_script = nullptr;
    static thread_local int t_left = 0;
    t_script = script;
    t_left = n;
    deep_ep::PendingErrorSource& source = deep_ep::pending_error_source();
    const deep_ep::PendingErrorSource real = source;
    source = [] {
        if (t_left <= 0) return cudaSuccess;
        --t_left;
        return static_cast<cudaError_t>(*t_script++);
    };
    const int rc = guarded([] { DEEP_EP_CHECK_LAUNCH(replayed_kernel); });
    source = real;
    return rc;
}

int deep_ep_core_device_count(int* count) {
    return guarded([&] { DEEP_EP_CUDA_CHECK(cudaGetDeviceCount(count)); });
}

int deep_ep_core_device_pci_bus_id(int device, char* bus_id, int length) {
    return guarded([&] { DEEP_EP_CUDA_CHECK(cudaDeviceGetPCIBusId(bus_id, length, device)); });
}

int deep_ep_core_device_by_pci_bus_id(const char* bus_id, int* device) {
    return guarded([&] { DEEP_EP_CUDA_CHECK(cudaDeviceGetByPCIBusId(device, bus_id)); });
}

int deep_ep_core_can_access_peer(int device, int peer_device, int* can_access) {
    return guarded([&] {
        if (device == peer_device) {
            *can_access = 1;
            return;
        }
        DEEP_EP_CUDA_CHECK(cudaDeviceCanAccessPeer(can_access, device, peer_device));
    });
}

int deep_ep_runtime_create(int rank, int num_ranks, int device, int64_t num_nvl_bytes, double timeout_s, void** rt) {
    return guarded([&] { *rt = new deep_ep::Runtime(rank, num_ranks, device, num_nvl_bytes, timeout_s); });
}

int deep_ep_runtime_destroy(void* rt) {
    return guarded([&] { delete as_runtime(rt); });
}

int deep_ep_runtime_ipc_handle(void* rt, void* handle_out, int handle_bytes) {
    return guarded([&] {
        deep_ep::host_check(handle_bytes == static_cast<int>(sizeof(cudaIpcMemHandle_t)),
                            "deep_ep: an IPC handle has " + std::to_string(sizeof(cudaIpcMemHandle_t)) + " bytes");
        as_runtime(rt)->ipc_handle(static_cast<cudaIpcMemHandle_t*>(handle_out));
    });
}

int deep_ep_runtime_local_ptr(void* rt, uint64_t* ptr) {
    return guarded([&] { *ptr = reinterpret_cast<uint64_t>(as_runtime(rt)->data()); });
}

int deep_ep_runtime_open_peers(void* rt, const void* handles, const uint64_t* ptrs, const int* same_process) {
    return guarded([&] {
        as_runtime(rt)->open_peers(static_cast<const cudaIpcMemHandle_t*>(handles), ptrs, same_process);
    });
}

int deep_ep_runtime_synchronize(void* rt) {
    return guarded([&] {
        deep_ep::DeviceGuard guard(as_runtime(rt)->device());
        DEEP_EP_CUDA_CHECK(cudaDeviceSynchronize());
    });
}

int deep_ep_runtime_wait_recv_counters(void* rt, uint64_t stream, int num_local_experts, int* values) {
    int status = 0;
    const int rc = guarded([&] { status = as_runtime(rt)->wait_recv_counters(as_stream(stream), num_local_experts, values); });
    return rc != 0 ? -1 : status;
}

int deep_ep_runtime_take_worst_overflow(void* rt, int* value) {
    return guarded([&] { *value = as_runtime(rt)->take_worst_overflow(); });
}

int deep_ep_get_dispatch_layout(int device, uint64_t stream, void* num_tokens_per_rank, void* num_tokens_per_expert,
                                void* is_token_in_rank, const void* topk_idx, int num_tokens, int num_topk,
                                int num_experts, int num_ranks) {
    return guarded([&] {
        // This library's CUDA runtime keeps its own current device (static cudart): set it to the
        // stream's device before launching.
        deep_ep::DeviceGuard guard(device);
        deep_ep::layout::LayoutArgs args;
        args.num_tokens_per_rank = static_cast<int*>(num_tokens_per_rank);
        args.num_tokens_per_expert = static_cast<int*>(num_tokens_per_expert);
        args.is_token_in_rank = static_cast<bool*>(is_token_in_rank);
        args.topk_idx = static_cast<const int64_t*>(topk_idx);
        args.num_tokens = num_tokens;
        args.num_topk = num_topk;
        args.num_experts = num_experts;
        args.num_ranks = num_ranks;
        deep_ep::layout::get_dispatch_layout(args, as_stream(stream));
    });
}

int64_t deep_ep_intranode_buffer_bytes(int num_ranks, int num_channels, int num_slots, int num_experts,
                                       int64_t row_bytes, int num_topk, int num_scales, int is_combine) {
    int64_t bytes = -1;
    const int rc = guarded([&] {
        bytes = make_layout(num_ranks, num_channels, num_slots, num_experts, row_bytes, num_topk, num_scales,
                            is_combine != 0)
                    .total_bytes();
    });
    return rc == 0 ? bytes : -1;
}

int deep_ep_intranode_notify_dispatch(void* rt, uint64_t stream, void* rank_prefix_matrix, void* channel_prefix_matrix,
                                      void* recv_channel_prefix_matrix, const void* num_tokens_per_expert, const void* is_token_in_rank, int num_tokens,
                                      int num_experts, int num_channels, int num_slots, int64_t row_bytes, int num_topk,
                                      int num_scales, int expert_alignment, int num_worst_tokens) {
    return guarded([&] {
        deep_ep::Runtime* runtime = as_runtime(rt);
        deep_ep::DeviceGuard guard(runtime->device());
        deep_ep::host_check(num_experts > 0, "deep_ep: dispatch needs num_experts > 0");
        deep_ep::host_check(expert_alignment >= 1, "deep_ep: expert_alignment must be >= 1");
        deep_ep::intranode::NotifyDispatchArgs args;
        args.buffer = make_layout(runtime->num_ranks(), num_channels, num_slots, num_experts, row_bytes, num_topk,
                                  num_scales, false);
        check_fits(*runtime, args.buffer, "dispatch");
        runtime->check_grid(num_channels, false);  // fail before the count exchange, not after it
        args.rank_prefix_matrix = static_cast<int*>(rank_prefix_matrix);
        args.channel_prefix_matrix = static_cast<int*>(channel_prefix_matrix);
        args.recv_channel_prefix_matrix = static_cast<int*>(recv_channel_prefix_matrix);
        args.host_counters = runtime->device_counters();
        args.num_tokens_per_expert = static_cast<const int*>(num_tokens_per_expert);
        args.is_token_in_rank = static_cast<const bool*>(is_token_in_rank);
        args.num_tokens = num_tokens;
        args.num_experts = num_experts;
        args.expert_alignment = expert_alignment;
        args.num_worst_tokens = num_worst_tokens;
        args.peers = runtime->peers();
        args.rank = runtime->rank();
        args.timeout_ns = runtime->timeout_ns();
        // The host polls these after the launch; reset them before it (the previous dispatch's
        // values are final: its host wait returned).
        if (num_worst_tokens == 0) runtime->reset_recv_counters(args.buffer.num_local_experts);
        deep_ep::intranode::notify_dispatch(args, as_stream(stream));
    });
}

int deep_ep_intranode_dispatch(void* rt, uint64_t stream, void* recv_x, void* recv_x_scales, void* recv_topk_idx,
                               void* recv_topk_weights, void* recv_src_idx, void* send_head, const void* x,
                               const void* x_scales, int64_t scale_token_stride, int64_t scale_hidden_stride,
                               const void* topk_idx, const void* topk_weights, const void* is_token_in_rank,
                               const void* rank_prefix_matrix, const void* recv_channel_prefix_matrix, int num_tokens,
                               int num_recv_rows, int fill_trailing_rows, int num_experts, int num_channels,
                               int num_slots, int num_max_send_tokens, int64_t row_bytes, int num_topk, int num_scales,
                               int cached) {
    return guarded([&] {
        deep_ep::Runtime* runtime = as_runtime(rt);
        deep_ep::DeviceGuard guard(runtime->device());
        deep_ep::intranode::DispatchArgs args;
        args.buffer = make_layout(runtime->num_ranks(), num_channels, num_slots, num_experts, row_bytes, num_topk,
                                  num_scales, false);
        check_fits(*runtime, args.buffer, "dispatch");
        runtime->check_grid(num_channels, false);
        // Pointers may be NULL only where there is nothing to read or write.
        deep_ep::host_check(num_scales == 0 || num_tokens == 0 || x_scales != nullptr, "deep_ep: x_scales missing");
        deep_ep::host_check(num_scales == 0 || num_recv_rows == 0 || recv_x_scales != nullptr,
                            "deep_ep: recv_x_scales missing");
        deep_ep::host_check(num_topk == 0 || num_tokens == 0 || (topk_idx != nullptr && topk_weights != nullptr),
                            "deep_ep: topk_idx/topk_weights missing");
        deep_ep::host_check(num_topk == 0 || num_recv_rows == 0 || (recv_topk_idx != nullptr && recv_topk_weights != nullptr),
                            "deep_ep: recv_topk_idx/recv_topk_weights missing");
        deep_ep::host_check(num_recv_rows == 0 || recv_x != nullptr, "deep_ep: recv_x missing");
        deep_ep::host_check(cached != 0 || num_recv_rows == 0 || recv_src_idx != nullptr, "deep_ep: recv_src_idx missing");
        args.recv_x = static_cast<int4*>(recv_x);
        args.recv_x_scales = static_cast<int*>(recv_x_scales);
        args.recv_topk_idx = static_cast<int64_t*>(recv_topk_idx);
        args.recv_topk_weights = static_cast<float*>(recv_topk_weights);
        args.recv_src_idx = static_cast<int*>(recv_src_idx);
        args.send_head = static_cast<int*>(send_head);
        args.x = static_cast<const int4*>(x);
        args.x_scales = static_cast<const int*>(x_scales);
        args.scale_token_stride = scale_token_stride;
        args.scale_hidden_stride = scale_hidden_stride;
        args.topk_idx = static_cast<const int64_t*>(topk_idx);
        args.topk_weights = static_cast<const float*>(topk_weights);
        args.is_token_in_rank = static_cast<const bool*>(is_token_in_rank);
        args.rank_prefix_matrix = static_cast<const int*>(rank_prefix_matrix);
        args.recv_channel_prefix_matrix = static_cast<const int*>(recv_channel_prefix_matrix);
        args.num_tokens = num_tokens;
        args.num_recv_rows = num_recv_rows;
        args.fill_trailing_rows = fill_trailing_rows != 0;
        args.num_local_experts = args.buffer.num_local_experts;
        args.num_max_send_tokens = num_max_send_tokens;
        args.peers = runtime->peers();
        args.rank = runtime->rank();
        args.timeout_ns = runtime->timeout_ns();
        if (cached != 0) {
            deep_ep::intranode::CachedNotifyArgs notify;
            notify.buffer = args.buffer;
            notify.peers = args.peers;
            notify.rank = args.rank;
            notify.timeout_ns = args.timeout_ns;
            deep_ep::intranode::cached_notify(notify, as_stream(stream));
        }
        deep_ep::intranode::dispatch(args, as_stream(stream));
    });
}

int deep_ep_intranode_combine(void* rt, uint64_t stream, void* combined_x, void* combined_topk_weights, const void* x,
                              const void* topk_weights, const void* bias_0, const void* bias_1,
                              const void* rank_prefix_matrix, const void* recv_channel_prefix_matrix,
                              const void* send_head, int num_tokens, int num_channels, int num_slots,
                              int num_max_send_tokens, int64_t row_bytes, int num_topk) {
    return guarded([&] {
        deep_ep::Runtime* runtime = as_runtime(rt);
        deep_ep::DeviceGuard guard(runtime->device());
        deep_ep::intranode::CombineArgs args;
        args.buffer = make_layout(runtime->num_ranks(), num_channels, num_slots, 0, row_bytes, num_topk, 0, true);
        check_fits(*runtime, args.buffer, "combine");
        runtime->check_grid(num_channels, true);
        deep_ep::host_check(num_topk == 0 || num_tokens == 0 || combined_topk_weights != nullptr,
                            "deep_ep: combined_topk_weights missing");
        deep_ep::host_check(num_tokens == 0 || combined_x != nullptr, "deep_ep: combined_x missing");
        args.combined_x = static_cast<int4*>(combined_x);
        args.combined_topk_weights = static_cast<float*>(combined_topk_weights);
        args.x = static_cast<const int4*>(x);
        args.topk_weights = static_cast<const float*>(topk_weights);
        args.bias_0 = static_cast<const int4*>(bias_0);
        args.bias_1 = static_cast<const int4*>(bias_1);
        args.rank_prefix_matrix = static_cast<const int*>(rank_prefix_matrix);
        args.recv_channel_prefix_matrix = static_cast<const int*>(recv_channel_prefix_matrix);
        args.send_head = static_cast<const int*>(send_head);
        args.num_tokens = num_tokens;
        args.num_max_send_tokens = num_max_send_tokens;
        args.peers = runtime->peers();
        args.rank = runtime->rank();
        args.timeout_ns = runtime->timeout_ns();
        deep_ep::intranode::CachedNotifyArgs notify;
        notify.buffer = args.buffer;
        notify.peers = args.peers;
        notify.rank = args.rank;
        notify.timeout_ns = args.timeout_ns;
        deep_ep::intranode::cached_notify(notify, as_stream(stream));
        deep_ep::intranode::combine(args, as_stream(stream));
    });
}

/* ---- internode (two-hop) over the peer-memory transport */

int deep_ep_internode_call_bytes(void) { return static_cast<int>(sizeof(deep_ep_internode_call)); }

int deep_ep_internode_layout_bytes(const deep_ep_internode_call* call, int64_t* rdma_bytes, int64_t* nvl_bytes) {
    return guarded([&] {
        deep_ep::host_check(call != nullptr, "deep_ep internode: null call");
        deep_ep::internode::check_call(*call);
        const deep_ep::InternodeLayout layout = deep_ep::internode::call_layout(*call);
        *rdma_bytes = layout.rdma_bytes();
        *nvl_bytes = layout.nvl_bytes();
    });
}

int deep_ep_internode_launch(void* rt, const deep_ep_internode_call* call, int64_t nvl_region_bytes, uint64_t stream) {
    return guarded([&] {
        deep_ep::Runtime* runtime = as_runtime(rt);
        deep_ep::host_check(call != nullptr, "deep_ep internode: null call");
        deep_ep::DeviceGuard guard(runtime->device());
        deep_ep_internode_call c = *call;
        deep_ep::host_check(c.rank == runtime->rank() && c.num_ranks == runtime->num_ranks(),
                            "deep_ep internode: the call's rank / num_ranks do not match the runtime");
        deep_ep::internode::check_call(c);
        const deep_ep::InternodeLayout layout = deep_ep::internode::call_layout(c);
        deep_ep::host_check(nvl_region_bytes >= 0 && nvl_region_bytes % 128 == 0 &&
                                nvl_region_bytes <= runtime->num_nvl_bytes(),
                            "deep_ep internode: bad NVL region size");
        const char* op = c.op == DEEP_EP_INTERNODE_COMBINE ? "combine" : "dispatch";
        deep_ep::host_check(layout.nvl_bytes() <= nvl_region_bytes,
                            std::string("deep_ep: the internode ") + op + " needs " + std::to_string(layout.nvl_bytes()) +
                                " bytes of NVLink buffer, but the Buffer has num_nvl_bytes=" +
                                std::to_string(nvl_region_bytes) +
                                "; allocate more or use a config with fewer SMs / smaller num_max_nvl_chunked_recv_tokens");
        deep_ep::host_check(layout.rdma_bytes() <= runtime->num_nvl_bytes() - nvl_region_bytes,
                            std::string("deep_ep: the internode ") + op + " needs " + std::to_string(layout.rdma_bytes()) +
                                " bytes of RDMA buffer, but the Buffer has num_rdma_bytes=" +
                                std::to_string(runtime->num_nvl_bytes() - nvl_region_bytes) +
                                "; allocate more (Buffer.get_rdma_buffer_size_hint) or use a config with fewer SMs / "
                                "smaller num_max_rdma_chunked_recv_tokens");
        const deep_ep::PeerBuffers& peers = runtime->peers();
        const int P = c.num_ranks_per_node, node = c.rank / P;
        for (int r = 0; r < c.num_ranks; ++r) c.rdma_peers[r] = static_cast<char*>(peers.data[r]) + nvl_region_bytes;
        for (int j = 0; j < P; ++j) c.nvl_peers[j] = peers.data[node * P + j];
        c.rdma_local = c.rdma_peers[c.rank];
        c.host_counters = runtime->device_counters();
        c.timeout_ns = runtime->timeout_ns();
        c.device = runtime->device();
        if (c.op == DEEP_EP_INTERNODE_NOTIFY && c.num_worst_tokens == 0)
            runtime->reset_recv_counters(c.num_experts / c.num_ranks);
        deep_ep::internode::launch_peer(c, as_stream(stream));
    });
}

int deep_ep_runtime_peer_ptr(void* rt, int peer, uint64_t* ptr) {
    return guarded([&] {
        deep_ep::Runtime* runtime = as_runtime(rt);
        deep_ep::host_check(peer >= 0 && peer < runtime->num_ranks(), "deep_ep runtime: bad peer " + std::to_string(peer));
        *ptr = reinterpret_cast<uint64_t>(runtime->peers().data[peer]);
    });
}

int deep_ep_runtime_device_counters(void* rt, uint64_t* ptr) {
    return guarded([&] { *ptr = reinterpret_cast<uint64_t>(as_runtime(rt)->device_counters()); });
}

int deep_ep_runtime_reset_recv_counters(void* rt, int num_local_experts) {
    return guarded([&] { as_runtime(rt)->reset_recv_counters(num_local_experts); });
}

int deep_ep_runtime_host_counter(void* rt, int index, int* value) {
    return guarded([&] { *value = as_runtime(rt)->host_counter(index); });
}

int deep_ep_host_internode_layout(int num_ranks, int num_ranks_per_node, int num_channels, int num_rdma_slots,
                                  int num_nvl_slots, int num_local_experts, int64_t row_bytes, int num_topk,
                                  int num_scales, int is_combine, int64_t* rdma_offsets, int num_rdma_offsets,
                                  int64_t* nvl_offsets, int num_nvl_offsets) {
    const deep_ep::InternodeLayout l =
        deep_ep::internode_layout(num_ranks, num_ranks_per_node, num_channels, num_rdma_slots, num_nvl_slots,
                                  num_local_experts, row_bytes, num_topk, num_scales, is_combine != 0);
    for (int i = 0; i < num_rdma_offsets && i < deep_ep::InternodeLayout::kNumRdma; ++i) rdma_offsets[i] = l.rdma_offsets[i];
    for (int i = 0; i < num_nvl_offsets && i < deep_ep::InternodeLayout::kNumNvl; ++i) nvl_offsets[i] = l.nvl_offsets[i];
    return static_cast<int>(l.msg_bytes);
}

void deep_ep_host_channel_range(int num_tokens, int num_channels, int channel, int* begin, int* end) {
    const deep_ep::ChannelRange r = deep_ep::channel_range(num_tokens, num_channels, channel);
    *begin = r.begin;
    *end = r.end;
}

void deep_ep_host_recv_segment(const int* rank_prefix_matrix, const int* recv_channel_prefix_matrix, int num_ranks,
                               int num_channels, int rank, int src, int channel, int* row_begin, int* count) {
    const deep_ep::RecvSegment s = deep_ep::recv_segment(rank_prefix_matrix, recv_channel_prefix_matrix, num_ranks,
                                                         num_channels, rank, src, channel);
    *row_begin = s.row_begin;
    *count = s.count;
}

int deep_ep_host_aligned_count(int count, int alignment) { return deep_ep::aligned_count(count, alignment); }

int deep_ep_host_ring_free_slots(int tail, int head, int capacity) {
    return deep_ep::ring_free_slots(tail, head, capacity);
}

int64_t deep_ep_host_intranode_layout(int num_ranks, int num_channels, int num_slots, int num_local_experts,
                                      int64_t row_bytes, int num_topk, int num_scales, int is_combine, int64_t* offsets,
                                      int num_offsets) {
    const deep_ep::IntranodeLayout layout =
        is_combine != 0 ? deep_ep::combine_layout(num_ranks, num_channels, num_slots, row_bytes, num_topk)
                        : deep_ep::dispatch_layout(num_ranks, num_channels, num_slots, num_local_experts, row_bytes,
                                                   num_topk, num_scales);
    for (int i = 0; i < num_offsets && i < deep_ep::IntranodeLayout::kNumRegions; ++i) offsets[i] = layout.offset(i);
    return layout.total_bytes();
}

}  // extern "C"

// ---------------------------------------------------------------------------------------------
// Low-latency kernels (deep_ep_ll.h): prepare / peer-memory send / receive.
#include "deep_ep_ll.h"
#include "kernels/low_latency.cuh"
#include "kernels/low_latency_send.cuh"
#include "kernels/transport_peer.cuh"

// Instantiated once, in kernels/low_latency.cu.
extern template void deep_ep::ll::launch_send<deep_ep::transport::PeerTransport>(
    const deep_ep_ll_call&, const deep_ep::transport::PeerTransport&, cudaStream_t);

extern "C" {

int deep_ep_ll_call_bytes(void) { return static_cast<int>(sizeof(deep_ep_ll_call)); }

int64_t deep_ep_ll_workspace_words(int num_max_tokens, int num_experts, int num_ranks) {
    if (num_max_tokens < 1 || num_ranks < 1 || num_experts < num_ranks || num_experts % num_ranks != 0) return -1;
    return deep_ep::ll::Workspace(num_max_tokens, num_experts, num_ranks).total_words();
}

int deep_ep_ll_layout(int num_max_tokens, int hidden, int num_experts, int64_t* out, int num_out) {
    return guarded([&] {
        deep_ep::host_check(num_max_tokens > 0 && hidden > 0 && hidden % 128 == 0 && num_experts > 0,
                            "deep_ep_ll_layout: bad arguments");
        const deep_ep::ll::LowLatencyLayout layout(num_max_tokens, hidden, num_experts);
        const int64_t values[] = {layout.signaling_offset(0), layout.signaling_offset(1), layout.send_offset(0),
                                  layout.send_offset(1), layout.recv_offset(0), layout.recv_offset(1),
                                  layout.total_bytes(), layout.dispatch_msg_bytes, layout.combine_msg_bytes};
        for (int i = 0; i < num_out && i < 9; ++i) out[i] = values[i];
    });
}

void deep_ep_ll_host_fp8_cast(const uint16_t* x, int n, int round_scale, uint8_t* out, float* scales) {
    using namespace deep_ep::ll;
    for (int g = 0; g < n / kGroup; ++g) {
        float amax = 0.0f;
        for (int i = 0; i < kGroup; ++i) amax = fmaxf(amax, fabsf(bf16_bits_to_float(x[g * kGroup + i])));
        const float scale_inv = fp8_scale_inv(amax, round_scale != 0);
        const float inv = ieee_div(1.0f, scale_inv);  // = __frcp_rn on the device
        scales[g] = scale_inv;
        for (int i = 0; i < kGroup; ++i) out[g * kGroup + i] = fp8_quantize(bf16_bits_to_float(x[g * kGroup + i]), inv);
    }
}

void deep_ep_ll_host_logfmt10_round(const uint16_t* x, int n, uint16_t* out) {
    using namespace deep_ep::ll;
    for (int g = 0; g < n / kGroup; ++g) {
        const uint16_t* in = x + g * kGroup;
        float amax = 0.0f, amin = bits_to_float(0x7f800000u);
        bool nonfinite = false;
        for (int i = 0; i < kGroup; ++i) {
            const float a = fabsf(bf16_bits_to_float(in[i]));
            nonfinite |= !std::isfinite(a);
            amax = fmaxf(amax, a);
            if (a != 0.0f) amin = fminf(amin, a);
        }
        const LogfmtGroup params = logfmt10_group(amin, amax, nonfinite);
        for (int i = 0; i < kGroup; ++i) out[g * kGroup + i] = params.passthrough ? in[i] : logfmt10_element(in[i], params);
    }
}

int deep_ep_ll_host_pack_signal(int epoch, int count) { return deep_ep::ll::pack_signal(epoch, count); }
int deep_ep_ll_host_next_epoch(int epoch) { return deep_ep::ll::next_epoch(epoch); }

// Host replays of the kernels' per-call workspace bookkeeping (low_latency.cuh), for the CPU tests.
int deep_ep_ll_host_begin_slot(int32_t* workspace, const deep_ep_ll_call* call) {
    return guarded([&] {
        deep_ep::host_check(workspace != nullptr && call != nullptr, "deep_ep_ll_host_begin_slot: null argument");
        const deep_ep::ll::Workspace ws(call->num_max_tokens, call->num_experts, call->num_ranks);
        deep_ep::ll::begin_slot_call(workspace, ws, call->slot, 0, 1);
    });
}

int deep_ep_ll_host_publish_counts(int32_t* workspace, const deep_ep_ll_call* call, int local_expert) {
    return guarded([&] {
        deep_ep::host_check(workspace != nullptr && call != nullptr, "deep_ep_ll_host_publish_counts: null argument");
        const deep_ep::ll::Workspace ws(call->num_max_tokens, call->num_experts, call->num_ranks);
        workspace[ws.ready(call->slot) + local_expert] = deep_ep::ll::ready_value(workspace[call->slot]);
    });
}

int deep_ep_ll_host_counts_published(const int32_t* workspace, const deep_ep_ll_call* call, int local_expert) {
    if (workspace == nullptr || call == nullptr) return -1;
    const deep_ep::ll::Workspace ws(call->num_max_tokens, call->num_experts, call->num_ranks);
    return deep_ep::ll::counts_published(workspace[ws.ready(call->slot) + local_expert], workspace[call->slot]) ? 1 : 0;
}

int deep_ep_ll_prepare(const deep_ep_ll_call* call, uint64_t stream) {
    return guarded([&] {
        deep_ep::host_check(call != nullptr, "deep_ep_ll_prepare: null call");
        deep_ep::ll::check_call(*call);  // argument errors before any CUDA call
        deep_ep::DeviceGuard guard(call->device);
        deep_ep::ll::prepare(*call, as_stream(stream));
    });
}

int deep_ep_ll_peer_send(void* rt, const deep_ep_ll_call* call, uint64_t stream) {
    return guarded([&] {
        deep_ep::Runtime* runtime = as_runtime(rt);
        deep_ep::host_check(call != nullptr, "deep_ep_ll_peer_send: null call");
        deep_ep::host_check(runtime->num_ranks() == call->num_ranks && runtime->rank() == call->rank,
                            "deep_ep_ll_peer_send: the runtime's ranks do not match the call");
        deep_ep::host_check(call->buffer == runtime->data(), "deep_ep_ll_peer_send: call->buffer is not the runtime's buffer");
        deep_ep::ll::check_call(*call);
        deep_ep::host_check(call->device == runtime->device(), "deep_ep_ll_peer_send: the call's device " +
                                                                   std::to_string(call->device) + " is not the runtime's " +
                                                                   std::to_string(runtime->device()));
        deep_ep::DeviceGuard guard(runtime->device());
        const deep_ep::PeerBuffers& peers = runtime->peers();
        deep_ep::transport::PeerTransport tr{};
        for (int r = 0; r < runtime->num_ranks(); ++r) tr.base[r] = static_cast<char*>(peers.data[r]);
        tr.rank = runtime->rank();
        tr.num_ranks = runtime->num_ranks();
        deep_ep::ll::launch_send(*call, tr, as_stream(stream));
    });
}

int deep_ep_ll_receive(const deep_ep_ll_call* call, uint64_t stream) {
    return guarded([&] {
        deep_ep::host_check(call != nullptr, "deep_ep_ll_receive: null call");
        deep_ep::ll::check_call(*call);  // argument errors before any CUDA call
        deep_ep::DeviceGuard guard(call->device);
        deep_ep::ll::receive(*call, as_stream(stream));
    });
}

}  // extern "C"

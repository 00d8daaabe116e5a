// The internode kernels over the peer-memory transport: every rank maps every other rank's RDMA
// region (CUDA IPC), which is what "virtual nodes" on one host (and the GPU tests on one GPU) use.
// Real multi-node runs use the NVSHMEM instantiation in libdeep_ep_nvshmem.so (csrc/nvshmem/).
#include "api.cuh"
#include "internode.cuh"
#include "transport_peer.cuh"

namespace deep_ep {
namespace internode {

void launch_peer(const deep_ep_internode_call& call, cudaStream_t stream) {
    host_check(call.num_ranks >= 1 && call.num_ranks <= kMaxNvlRanks,
               "deep_ep internode (peer memory): at most " + std::to_string(kMaxNvlRanks) +
                   " ranks share mapped memory, got " + std::to_string(call.num_ranks));
    transport::PeerTransport tr{};
    for (int r = 0; r < call.num_ranks; ++r) {
        host_check(call.rdma_peers[r] != nullptr, "deep_ep internode (peer memory): missing the buffer of rank " +
                                                      std::to_string(r));
        tr.base[r] = static_cast<char*>(call.rdma_peers[r]);
    }
    tr.rank = call.rank;
    tr.num_ranks = call.num_ranks;
    launch(call, tr, stream);
}

}  // namespace internode
}  // namespace deep_ep

// NVSHMEM stand-in for the emulated build of libdeep_ep_nvshmem.so (see nvshmem.h for the contract).
//
// World: the root PE (nvshmemx_get_uniqueid) creates a memfd with the World page below; every PE
// opens it through /proc/<root pid>/fd, creates its own symmetric heap (a memfd of
// NVSHMEM_SYMMETRIC_SIZE bytes, sparse) and publishes it there; after a barrier every PE maps every
// heap. nvshmem_align is a bump allocator: every PE allocates in the same order, so an offset is
// symmetric. Puts are buffered per issuing warp (of the calling block) until that warp's quiet/fence;
// a put-with-signal is delivered at the call, data first, then its signal.
#include <fcntl.h>
#include <sched.h>
#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <string>
#include <vector>

#include "nvshmem.h"

namespace {

constexpr int32_t kMagic = 0x4d485345;  // "ESHM"
constexpr int kMaxPes = 64;

struct World {
    int32_t npes;
    std::atomic<int32_t> joined;
    std::atomic<int32_t> barrier_count;
    std::atomic<int32_t> barrier_generation;
    struct {
        int32_t pid;
        int32_t fd;
        uint64_t bytes;
    } heap[kMaxPes];
};

int g_root_fd = -1;              // the root's world memfd (kept open: the others open it by /proc path)
World* g_world = nullptr;
int g_pe = -1, g_npes = 0;
int g_heap_fd = -1;
uint64_t g_heap_bytes = 0;
char* g_heaps[kMaxPes] = {};     // every PE's heap, mapped here (g_heaps[g_pe] is ours)
uint64_t g_used = 0;
std::vector<uint64_t> g_allocations;
bool g_no_p2p = false;

// Calls of this PE, by kind (deep_ep_emu_nvshmem_counts). A warp-collective call counts once.
enum Count { kPut, kPutSignal, kSignal, kQuiet, kFence, kAtomic, kNumCounts };
std::atomic<int64_t> g_counts[kNumCounts];

void die(const std::string& message) {
    std::fprintf(stderr, "deep_ep emulated NVSHMEM: %s\n", message.c_str());
    std::abort();
}

void world_barrier() {
    World& w = *g_world;
    const int generation = w.barrier_generation.load();
    if (w.barrier_count.fetch_add(1) + 1 == w.npes) {
        w.barrier_count.store(0);
        w.barrier_generation.fetch_add(1);
        return;
    }
    const auto start = std::chrono::steady_clock::now();
    while (w.barrier_generation.load() == generation) {
        sched_yield();
        if (std::chrono::steady_clock::now() - start > std::chrono::seconds(300))
            die("nvshmem_barrier_all: a PE did not arrive within 300 s");
    }
}

int open_fd_of(int pid, int fd) {
    const std::string path = "/proc/" + std::to_string(pid) + "/fd/" + std::to_string(fd);
    return open(path.c_str(), O_RDWR | O_CLOEXEC);
}

struct Put {
    char* dest;
    std::vector<char> data;
};

// Pending puts of each warp of the block running on this OS thread (one block per thread).
thread_local std::vector<Put> t_pending[32];

void complete_warp_puts() {
    std::vector<Put>& pending = t_pending[(threadIdx.x / 32) % 32];
    for (Put& p : pending) std::memcpy(p.dest, p.data.data(), p.data.size());
    pending.clear();
    std::atomic_thread_fence(std::memory_order_seq_cst);
}

char* peer_address(const void* dest, int pe) {
    const uint64_t offset = static_cast<const char*>(dest) - g_heaps[g_pe];
    if (pe < 0 || pe >= g_npes || offset >= g_heap_bytes)
        die("an address outside the symmetric heap, or a bad PE " + std::to_string(pe));
    return g_heaps[pe] + offset;
}

}  // namespace

int nvshmemx_get_uniqueid(nvshmemx_uniqueid_t* id) {
    if (g_root_fd < 0) {
        g_root_fd = memfd_create("deep_ep_emu_nvshmem_world", MFD_CLOEXEC);
        if (g_root_fd < 0 || ftruncate(g_root_fd, sizeof(World)) != 0) return 1;
    }
    std::memset(id, 0, sizeof(*id));
    id->version = 1;
    id->pid = getpid();
    id->fd = g_root_fd;
    id->magic = kMagic;
    return 0;
}

int nvshmemx_set_attr_uniqueid_args(int rank, int nranks, const nvshmemx_uniqueid_t* id, nvshmemx_init_attr_t* attr) {
    attr->rank = rank;
    attr->nranks = nranks;
    attr->uid = *id;
    return id->magic == kMagic ? 0 : 1;
}

int nvshmemi_init_thread(int, int* provided, unsigned int, nvshmemx_init_attr_t* attr, nvshmemi_version_t) {
    *provided = NVSHMEM_THREAD_SERIALIZED;
    if (attr->nranks < 1 || attr->nranks > kMaxPes || attr->uid.magic != kMagic) return 2;
    const int fd = attr->uid.pid == getpid() ? dup(attr->uid.fd) : open_fd_of(attr->uid.pid, attr->uid.fd);
    if (fd < 0) return 3;
    void* w = mmap(nullptr, sizeof(World), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (w == MAP_FAILED) return 4;
    g_world = static_cast<World*>(w);
    g_pe = attr->rank;
    g_npes = attr->nranks;
    const char* size = std::getenv("NVSHMEM_SYMMETRIC_SIZE");
    g_heap_bytes = size != nullptr && *size != '\0' ? std::strtoull(size, nullptr, 10) : (1ull << 30);
    g_heap_bytes = (g_heap_bytes + 4095) / 4096 * 4096;
    g_heap_fd = memfd_create("deep_ep_emu_nvshmem_heap", MFD_CLOEXEC);
    if (g_heap_fd < 0 || ftruncate(g_heap_fd, static_cast<off_t>(g_heap_bytes)) != 0) return 5;
    const char* no_p2p = std::getenv("DEEP_EP_EMU_NVSHMEM_NO_P2P");
    g_no_p2p = no_p2p != nullptr && std::strcmp(no_p2p, "1") == 0;
    g_world->npes = g_npes;  // every PE writes the same value
    g_world->heap[g_pe].pid = getpid();
    g_world->heap[g_pe].fd = g_heap_fd;
    g_world->heap[g_pe].bytes = g_heap_bytes;
    world_barrier();
    for (int pe = 0; pe < g_npes; ++pe) {
        if (g_world->heap[pe].bytes != g_heap_bytes) return 6;  // NVSHMEM_SYMMETRIC_SIZE differs between PEs
        const int hfd = pe == g_pe ? dup(g_heap_fd) : open_fd_of(g_world->heap[pe].pid, g_world->heap[pe].fd);
        if (hfd < 0) return 7;
        void* p = mmap(nullptr, g_heap_bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, hfd, 0);
        close(hfd);
        if (p == MAP_FAILED) return 8;
        g_heaps[pe] = static_cast<char*>(p);
    }
    world_barrier();  // nobody closes its heap before everyone mapped it
    g_used = 0;
    g_allocations.clear();
    return 0;
}

int nvshmemx_init_status(void) { return g_world != nullptr ? 2 : 0; }
int nvshmem_my_pe(void) { return g_pe; }
int nvshmem_n_pes(void) { return g_npes; }

void* nvshmem_align(size_t alignment, size_t size) {
    const uint64_t begin = (g_used + alignment - 1) / alignment * alignment;
    if (begin + size > g_heap_bytes) return nullptr;
    g_used = begin + size;
    g_allocations.push_back(begin);
    world_barrier();
    return g_heaps[g_pe] + begin;
}

void nvshmem_free(void* ptr) {
    world_barrier();
    const uint64_t offset = static_cast<char*>(ptr) - g_heaps[g_pe];
    if (!g_allocations.empty() && g_allocations.back() == offset) {  // the last one: give it back
        g_allocations.pop_back();
        g_used = offset;
    }
}

void nvshmem_barrier_all(void) { world_barrier(); }

void nvshmem_finalize(void) {
    world_barrier();
    for (int pe = 0; pe < g_npes; ++pe) {
        if (g_heaps[pe] != nullptr) munmap(g_heaps[pe], g_heap_bytes);
        g_heaps[pe] = nullptr;
    }
    if (g_heap_fd >= 0) close(g_heap_fd);
    g_heap_fd = -1;
    munmap(g_world, sizeof(World));
    g_world = nullptr;
    g_pe = -1;
    g_npes = 0;
}

void* nvshmem_ptr(const void* dest, int pe) {
    if (g_no_p2p && pe != g_pe) return nullptr;
    return peer_address(dest, pe);
}

void nvshmemx_putmem_nbi_warp(void* dest, const void* source, size_t bytes, int pe) {
    // A warp-collective call: every lane of the warp passes the same arguments; one copy is queued.
    __syncwarp();
    if (threadIdx.x % 32 == 0) {
        g_counts[kPut].fetch_add(1);
        Put p{peer_address(dest, pe), std::vector<char>(bytes)};
        std::memcpy(p.data.data(), source, bytes);  // nbi: the source may change only after quiet
        t_pending[(threadIdx.x / 32) % 32].push_back(std::move(p));
    }
    __syncwarp();
}

void nvshmem_quiet(void) {
    g_counts[kQuiet].fetch_add(1);
    complete_warp_puts();
}

void nvshmem_fence(void) {
    g_counts[kFence].fetch_add(1);
    complete_warp_puts();
}

void nvshmem_int_atomic_set(int* dest, int value, int pe) {
    g_counts[kAtomic].fetch_add(1);
    ::deep_ep::emu::atomic_point();
    __atomic_store_n(reinterpret_cast<int*>(peer_address(dest, pe)), value, __ATOMIC_RELEASE);
}

namespace {

void apply_signal(uint64_t* sig_addr, uint64_t signal, int sig_op, int pe) {
    uint64_t* word = reinterpret_cast<uint64_t*>(peer_address(sig_addr, pe));
    if (sig_op == NVSHMEM_SIGNAL_SET)
        __atomic_store_n(word, signal, __ATOMIC_RELEASE);
    else if (sig_op == NVSHMEM_SIGNAL_ADD)
        __atomic_fetch_add(word, signal, __ATOMIC_RELEASE);
    else
        die("a signal operation other than NVSHMEM_SIGNAL_SET / ADD: " + std::to_string(sig_op));
}

}  // namespace

void nvshmemx_signal_op(uint64_t* sig_addr, uint64_t signal, int sig_op, int pe) {
    g_counts[kSignal].fetch_add(1);
    ::deep_ep::emu::atomic_point();
    apply_signal(sig_addr, signal, sig_op, pe);
}

void nvshmemx_putmem_signal_nbi_warp(void* dest, const void* source, size_t bytes, uint64_t* sig_addr, uint64_t signal,
                                     int sig_op, int pe) {
    // Warp-collective like nvshmemx_putmem_nbi_warp: lane 0 delivers the data, then the signal.
    __syncwarp();
    if (threadIdx.x % 32 == 0) {
        g_counts[kPutSignal].fetch_add(1);
        std::memcpy(peer_address(dest, pe), source, bytes);
        std::atomic_thread_fence(std::memory_order_seq_cst);
        ::deep_ep::emu::atomic_point();
        apply_signal(sig_addr, signal, sig_op, pe);
    }
    __syncwarp();
}

int nvshmem_uint64_test(uint64_t* ivar, int cmp, uint64_t cmp_value) {
    if (cmp != NVSHMEM_CMP_GE) die("nvshmem_uint64_test: only NVSHMEM_CMP_GE is emulated");
    ::deep_ep::emu::spin_point(ivar, __FILE__, __LINE__);
    return __atomic_load_n(ivar, __ATOMIC_ACQUIRE) >= cmp_value ? 1 : 0;
}

extern "C" int deep_ep_emu_nvshmem_counts(int64_t* out, int n, int reset) {
    int written = 0;
    for (int i = 0; i < kNumCounts && i < n; ++i, ++written) out[i] = g_counts[i].load();
    if (reset)
        for (auto& count : g_counts) count.store(0);
    return written;
}

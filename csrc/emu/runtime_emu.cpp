// Stand-ins for the CUDA runtime calls of csrc/runtime and csrc/capi.cu, for the emulated build.
//
// "Device" memory is host memory: cudaMalloc maps a memfd (MAP_SHARED) so that an IPC handle can
// really map it in another process (/proc/<pid>/fd/<fd>; nothing is left in /dev/shm). Streams are
// host-synchronous: every launch and memset has finished when the call returns, so events, stream
// queries and synchronisation only report the sticky error of a failed kernel.
#include "emu.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <map>
#include <mutex>

namespace {

constexpr uint32_t kHandleMagic = 0x554d4544;  // "DEMU"
constexpr int kNumSms = 132;

struct HandleBits {
    uint32_t magic;
    int32_t pid;
    int32_t fd;
    int32_t pad;
    uint64_t bytes;
};
static_assert(sizeof(HandleBits) <= sizeof(cudaIpcMemHandle_t), "IPC handle too small");

struct Allocation {
    int fd;       // memfd of a cudaMalloc, -1 for an opened IPC mapping
    size_t bytes;
};

std::mutex g_mutex;
std::map<void*, Allocation> g_allocations;
thread_local int t_device = 0;
thread_local cudaError_t t_last_error = cudaSuccess;
std::string g_message_storage;

cudaError_t sticky() {
    return deep_ep::emu::sticky_error(nullptr) ? cudaErrorLaunchFailure : cudaSuccess;
}

cudaError_t fail(cudaError_t err) {
    t_last_error = err;
    return err;
}

}  // namespace

extern "C" {

cudaError_t cudaGetDeviceCount(int* count) {
    *count = 1;
    return cudaSuccess;
}

cudaError_t cudaGetDevice(int* device) {
    *device = t_device;
    return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
    if (device != 0) return fail(cudaErrorInvalidDevice);
    t_device = device;
    return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
    if (device != 0) return fail(cudaErrorInvalidDevice);
    if (attr == cudaDevAttrMultiProcessorCount) {
        *value = kNumSms;
        return cudaSuccess;
    }
    return fail(cudaErrorInvalidValue);
}

cudaError_t cudaDeviceGetPCIBusId(char* bus_id, int len, int device) {
    if (device != 0) return fail(cudaErrorInvalidDevice);
    std::snprintf(bus_id, static_cast<size_t>(len), "emulated:0");
    return cudaSuccess;
}

cudaError_t cudaDeviceGetByPCIBusId(int* device, const char* bus_id) {
    if (std::strcmp(bus_id, "emulated:0") != 0) return fail(cudaErrorInvalidDevice);
    *device = 0;
    return cudaSuccess;
}

cudaError_t cudaDeviceCanAccessPeer(int* can_access, int device, int peer) {
    *can_access = device == 0 && peer == 0;
    return cudaSuccess;
}

cudaError_t cudaDeviceEnablePeerAccess(int, unsigned int) { return fail(cudaErrorPeerAccessAlreadyEnabled); }

cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* num_blocks, const void*, int block_size, size_t) {
    // One block per SM for the big kernels (their __launch_bounds__ ask for 1), as the host code assumes.
    *num_blocks = block_size > 512 ? 1 : 2048 / std::max(block_size, 1) > 2 ? 2 : 1;
    return cudaSuccess;
}

cudaError_t cudaMalloc(void** ptr, size_t bytes) {
    if (bytes == 0) bytes = 1;
    const int fd = memfd_create("deep_ep_emu", MFD_CLOEXEC);
    if (fd < 0) return fail(cudaErrorMemoryAllocation);
    if (ftruncate(fd, static_cast<off_t>(bytes)) != 0) {
        close(fd);
        return fail(cudaErrorMemoryAllocation);
    }
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
        close(fd);
        return fail(cudaErrorMemoryAllocation);
    }
    std::memset(p, 0xcd, bytes);  // cudaMalloc does not zero: neither does this (visibly)
    std::lock_guard<std::mutex> lock(g_mutex);
    g_allocations[p] = Allocation{fd, bytes};
    *ptr = p;
    return cudaSuccess;
}

cudaError_t cudaFree(void* ptr) {
    if (ptr == nullptr) return cudaSuccess;
    std::lock_guard<std::mutex> lock(g_mutex);
    auto it = g_allocations.find(ptr);
    if (it == g_allocations.end() || it->second.fd < 0) return fail(cudaErrorInvalidValue);
    munmap(ptr, it->second.bytes);
    close(it->second.fd);
    g_allocations.erase(it);
    return cudaSuccess;
}

cudaError_t cudaMemset(void* ptr, int value, size_t bytes) {
    if (cudaError_t e = sticky(); e != cudaSuccess) return fail(e);
    std::memset(ptr, value, bytes);
    return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t) { return cudaMemset(ptr, value, bytes); }

cudaError_t cudaHostAlloc(void** ptr, size_t bytes, unsigned int) {
    *ptr = std::calloc(1, bytes == 0 ? 1 : bytes);
    return *ptr != nullptr ? cudaSuccess : fail(cudaErrorMemoryAllocation);
}

cudaError_t cudaHostGetDevicePointer(void** device_ptr, void* host_ptr, unsigned int) {
    *device_ptr = host_ptr;
    return cudaSuccess;
}

cudaError_t cudaFreeHost(void* ptr) {
    std::free(ptr);
    return cudaSuccess;
}

cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* attr, const void* ptr) {
    std::memset(attr, 0, sizeof(*attr));
    attr->type = cudaMemoryTypeDevice;
    attr->device = 0;
    attr->devicePointer = const_cast<void*>(ptr);
    return cudaSuccess;
}

cudaError_t cudaIpcGetMemHandle(cudaIpcMemHandle_t* handle, void* ptr) {
    std::lock_guard<std::mutex> lock(g_mutex);
    auto it = g_allocations.find(ptr);
    if (it == g_allocations.end() || it->second.fd < 0) return fail(cudaErrorInvalidValue);
    std::memset(handle, 0, sizeof(*handle));
    HandleBits bits{kHandleMagic, static_cast<int32_t>(getpid()), it->second.fd, 0, it->second.bytes};
    std::memcpy(handle, &bits, sizeof(bits));
    return cudaSuccess;
}

cudaError_t cudaIpcOpenMemHandle(void** ptr, cudaIpcMemHandle_t handle, unsigned int) {
    HandleBits bits;
    std::memcpy(&bits, &handle, sizeof(bits));
    if (bits.magic != kHandleMagic) return fail(cudaErrorInvalidResourceHandle);
    const std::string path = "/proc/" + std::to_string(bits.pid) + "/fd/" + std::to_string(bits.fd);
    const int fd = open(path.c_str(), O_RDWR | O_CLOEXEC);
    if (fd < 0) return fail(cudaErrorInvalidResourceHandle);
    void* p = mmap(nullptr, bits.bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (p == MAP_FAILED) return fail(cudaErrorMapBufferObjectFailed);
    std::lock_guard<std::mutex> lock(g_mutex);
    g_allocations[p] = Allocation{-1, bits.bytes};
    *ptr = p;
    return cudaSuccess;
}

cudaError_t cudaIpcCloseMemHandle(void* ptr) {
    std::lock_guard<std::mutex> lock(g_mutex);
    auto it = g_allocations.find(ptr);
    if (it == g_allocations.end() || it->second.fd >= 0) return fail(cudaErrorInvalidValue);
    munmap(ptr, it->second.bytes);
    g_allocations.erase(it);
    return cudaSuccess;
}

cudaError_t cudaDeviceSynchronize(void) { return sticky() != cudaSuccess ? fail(sticky()) : cudaSuccess; }

cudaError_t cudaStreamQuery(cudaStream_t) { return sticky() != cudaSuccess ? fail(sticky()) : cudaSuccess; }

cudaError_t cudaGetLastError(void) {
    if (cudaError_t e = sticky(); e != cudaSuccess) return e;
    std::string message;
    if (deep_ep::emu::take_last_launch_error(&message)) {
        std::fprintf(stderr, "%s\n", message.c_str());
        t_last_error = cudaSuccess;
        return cudaErrorInvalidConfiguration;
    }
    const cudaError_t e = t_last_error;
    t_last_error = cudaSuccess;
    return e;
}

const char* cudaGetErrorName(cudaError_t error) {
    switch (error) {
        case cudaSuccess: return "cudaSuccess";
        case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
        case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
        case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
        case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
        case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
        case cudaErrorPeerAccessAlreadyEnabled: return "cudaErrorPeerAccessAlreadyEnabled";
        case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
        case cudaErrorMapBufferObjectFailed: return "cudaErrorMapBufferObjectFailed";
        default: return "cudaError(emulated)";
    }
}

const char* cudaGetErrorString(cudaError_t error) {
    if (error == cudaErrorLaunchFailure) {
        // The emulator's diagnosis of the failed kernel (the first one; the context stays dead).
        std::string message;
        deep_ep::emu::sticky_error(&message);
        std::lock_guard<std::mutex> lock(g_mutex);
        g_message_storage = "unspecified launch failure (emulator: " + message + ")";
        return g_message_storage.c_str();
    }
    if (error == cudaErrorInvalidConfiguration) return "invalid configuration argument (emulator: see stderr)";
    return cudaGetErrorName(error);
}

}  // extern "C"

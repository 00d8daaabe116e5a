// Emulated build only: a stand-in for the subset of NVSHMEM's API that csrc/nvshmem/ and
// kernels/transport_nvshmem.cuh use (found before the real header on the emulated include path).
// Semantics (nvshmem_emu.cpp): PEs are processes on this host; every PE maps every PE's symmetric
// heap (memfd); nvshmem_ptr returns the peer's mapping (NULL for other PEs with
// DEEP_EP_EMU_NVSHMEM_NO_P2P=1, which sends everything through puts); a put is buffered and becomes
// visible only when the issuing warp calls nvshmem_quiet or nvshmem_fence, so a missing quiet shows.
// A put-with-signal delivers its own data, then its signal, at the call (the warp's other buffered
// puts stay buffered); nvshmemx_signal_op is visible at once and flushes nothing, so a signal that
// relies on an earlier plain put without a quiet shows too. Every call is counted per PE
// (deep_ep_emu_nvshmem_counts below: the cost-model test, tests/test_internode_cost.py).
#pragma once

#include <cstddef>
#include <cstdint>

struct nvshmemx_uniqueid_t {
    int32_t version;
    int32_t pid;   // the root PE's process and its world memfd
    int32_t fd;
    int32_t magic;
    char pad[112];
};
#define NVSHMEMX_UNIQUEID_INITIALIZER {}

struct nvshmemx_init_attr_t {
    int rank;
    int nranks;
    nvshmemx_uniqueid_t uid;
};
#define NVSHMEMX_INIT_ATTR_INITIALIZER {}

struct nvshmemi_version_t {
    int major, minor, patch;
};
#define NVSHMEM_VENDOR_MAJOR_VERSION 3
#define NVSHMEM_VENDOR_MINOR_VERSION 0
#define NVSHMEM_VENDOR_PATCH_VERSION 0
#define NVSHMEM_THREAD_SERIALIZED 2
#define NVSHMEMX_INIT_WITH_UNIQUEID (1 << 3)

// host
int nvshmemx_get_uniqueid(nvshmemx_uniqueid_t* id);
int nvshmemx_set_attr_uniqueid_args(int rank, int nranks, const nvshmemx_uniqueid_t* id, nvshmemx_init_attr_t* attr);
inline void nvshmemx_init_init_attr_ver_only(nvshmemx_init_attr_t&) {}
int nvshmemi_init_thread(int requested, int* provided, unsigned int flags, nvshmemx_init_attr_t* attr,
                         nvshmemi_version_t version);
int nvshmemx_init_status(void);
int nvshmem_my_pe(void);
int nvshmem_n_pes(void);
void* nvshmem_align(size_t alignment, size_t size);
void nvshmem_free(void* ptr);
void nvshmem_barrier_all(void);
void nvshmem_finalize(void);

#define NVSHMEM_SIGNAL_SET 9
#define NVSHMEM_SIGNAL_ADD 10
#define NVSHMEM_CMP_GE 5

// device
void* nvshmem_ptr(const void* dest, int pe);
void nvshmemx_putmem_nbi_warp(void* dest, const void* source, size_t bytes, int pe);
void nvshmem_quiet(void);
void nvshmem_fence(void);
void nvshmem_int_atomic_set(int* dest, int value, int pe);
void nvshmemx_signal_op(uint64_t* sig_addr, uint64_t signal, int sig_op, int pe);
void nvshmemx_putmem_signal_nbi_warp(void* dest, const void* source, size_t bytes, uint64_t* sig_addr, uint64_t signal,
                                     int sig_op, int pe);
int nvshmem_uint64_test(uint64_t* ivar, int cmp, uint64_t cmp_value);

// Stand-in only (C ABI, for ctypes): this PE's counts of NVSHMEM device calls since the last reset, in
// the order of DEEP_EP_EMU_NVSHMEM_COUNT_NAMES; returns how many it wrote (at most n).
#define DEEP_EP_EMU_NVSHMEM_COUNT_NAMES "put,put_signal,signal,quiet,fence,atomic"
extern "C" __attribute__((visibility("default"))) int deep_ep_emu_nvshmem_counts(int64_t* out, int n, int reset);

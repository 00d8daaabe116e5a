// Error handling. Host: every CUDA call is checked and turned into a deep_ep::Error carrying the
// call, the CUDA error name and message, and where it happened; the C ABI catches it and hands the
// text to Python. Device: a bounded wait that expires prints who waited for what, then traps.
#pragma once

#include <cuda_runtime.h>

#include <cstdio>
#include <stdexcept>
#include <string>

namespace deep_ep {

class Error : public std::runtime_error {
   public:
    explicit Error(const std::string& what) : std::runtime_error(what) {}
};

inline std::string cuda_error_text(cudaError_t err) {
    return std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
}

[[noreturn]] inline void throw_cuda_error(cudaError_t err, const char* call, const char* file, int line) {
    throw Error(std::string("CUDA call `") + call + "` failed with " + cuda_error_text(err) + " (" + file + ":" +
                std::to_string(line) + ")");
}

// Checks a host-side condition on user-visible values; the message must name them.
inline void host_check(bool condition, const std::string& message) {
    if (!condition) throw Error(message);
}

// ---- launch checks. A CUDA runtime error that is not sticky stays pending on the host thread until
// cudaGetLastError reads it, so the check after a launch would report an error left by earlier work on
// the thread (a teardown, an ignored call) as the launch's. Every C entry point therefore takes the
// pending error first (clear_stale_cuda_error, in the entry points' `guarded` wrappers), and the check
// after a launch names the kernel. Both read the error through `pending_error_source()`, which is
// cudaGetLastError except in the host replay entry point the CPU tests drive with a scripted sequence
// (deep_ep_core_host_replay_launch_check).
using PendingErrorSource = cudaError_t (*)();
inline PendingErrorSource& pending_error_source() {
    static thread_local PendingErrorSource source = &cudaGetLastError;
    return source;
}

// Reads (and so clears) the error pending on this thread, if any. A sticky error cannot be cleared: the
// next launch then fails with it, which is its real cause.
inline void clear_stale_cuda_error() { (void)pending_error_source()(); }

inline void check_launch(const char* kernel, const char* file, int line) {
    const cudaError_t err = pending_error_source()();
    if (err != cudaSuccess)
        throw Error(std::string("launch of ") + kernel + " failed with " + cuda_error_text(err) + " (" + file + ":" +
                    std::to_string(line) + ")");
}

}  // namespace deep_ep

// A statement-like check of a CUDA runtime call (a macro only to capture the call text and line).
#define DEEP_EP_CUDA_CHECK(call)                                                        \
    do {                                                                                \
        cudaError_t deep_ep_err_ = (call);                                              \
        if (deep_ep_err_ != cudaSuccess) ::deep_ep::throw_cuda_error(deep_ep_err_, #call, __FILE__, __LINE__); \
    } while (0)

// After every kernel launch: reports the launch's error (a bad configuration, ...) naming the kernel.
#define DEEP_EP_CHECK_LAUNCH(kernel_name) ::deep_ep::check_launch(#kernel_name, __FILE__, __LINE__)

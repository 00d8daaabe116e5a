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

}  // namespace deep_ep

// A statement-like check of a CUDA runtime call (a macro only to capture the call text and line).
#define DEEP_EP_CUDA_CHECK(call)                                                        \
    do {                                                                                \
        cudaError_t deep_ep_err_ = (call);                                              \
        if (deep_ep_err_ != cudaSuccess) ::deep_ep::throw_cuda_error(deep_ep_err_, #call, __FILE__, __LINE__); \
    } while (0)

// After every kernel launch: reports a bad launch configuration at the launch site.
#define DEEP_EP_CHECK_LAUNCH(kernel_name) DEEP_EP_CUDA_CHECK(cudaGetLastError())

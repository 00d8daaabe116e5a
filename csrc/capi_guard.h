// The C ABI's error convention, shared by libdeep_ep_core.so and libdeep_ep_nvshmem.so: an entry
// point returns 0, or -1 after storing the C++ exception's message in its library's last-error
// string (each library keeps its own, read by its *_last_error() function).
#pragma once

#include <exception>
#include <string>
#include <utility>

namespace deep_ep {

template <typename F>
int capi_guarded(std::string& last_error, const char* library, F&& body) {
    try {
        std::forward<F>(body)();
        return 0;
    } catch (const std::exception& e) {
        last_error = e.what();
    } catch (...) {
        last_error = std::string(library) + ": unknown C++ exception";
    }
    return -1;
}

}  // namespace deep_ep

/* deep_ep._nvshmem_binding: the pybind11 module of libdeep_ep_nvshmem.so (the NVSHMEM half of
 * csrc/deep_ep_ll.h). Conventions as in binding_common.h; the call structs (LLCall, InternodeCall) and
 * CoreError are deep_ep._core_binding's, which this module imports.
 *
 * `open(path, host_library)` first loads NVSHMEM's host library (libnvshmem_host.so.3, by absolute path,
 * RTLD_GLOBAL) so that the dynamic linker resolves the library's NEEDED entry to it, then the library.
 */
#include <memory>
#include <vector>

#include "binding_common.h"
#include "deep_ep_internode.h"
#include "deep_ep_ll.h"

namespace deep_ep_binding {
namespace {

#define DEEP_EP_NVSHMEM_FUNCTIONS(X)                                                                            \
    X(deep_ep_nvshmem_abi_version) X(deep_ep_nvshmem_last_error) X(deep_ep_nvshmem_call_bytes)                  \
    X(deep_ep_nvshmem_uniqueid_bytes) X(deep_ep_nvshmem_get_uniqueid) X(deep_ep_nvshmem_init)                   \
    X(deep_ep_nvshmem_alloc) X(deep_ep_nvshmem_free) X(deep_ep_nvshmem_barrier) X(deep_ep_nvshmem_finalize)     \
    X(deep_ep_nvshmem_info) X(deep_ep_nvshmem_ll_send) X(deep_ep_nvshmem_internode_launch)                      \
    X(deep_ep_nvshmem_internode_call_bytes)

class Nvshmem {
public:
    // host_library "": none to preload (a build over an NVSHMEM stand-in, e.g. the emulated core's)
    Nvshmem(const std::string& path, const std::string& host_library)
        : host_(open_host(host_library)), lib_(path, RTLD_NOW | RTLD_LOCAL) {
#define DEEP_EP_LOAD(name) name = lib_.symbol<decltype(&::name)>(#name);
        DEEP_EP_NVSHMEM_FUNCTIONS(DEEP_EP_LOAD)
#undef DEEP_EP_LOAD
        if (deep_ep_nvshmem_call_bytes() != static_cast<int>(sizeof(deep_ep_ll_call)))
            throw LibraryError(path + ": deep_ep_ll_call size mismatch with this binding: rebuild with "
                               "`python build_core.py`");
        if (deep_ep_nvshmem_internode_call_bytes() != static_cast<int>(sizeof(deep_ep_internode_call)))
            throw LibraryError(path + ": deep_ep_internode_call size mismatch with this binding: rebuild with "
                               "`python build_core.py`");
    }

    const std::string& path() const { return lib_.path(); }
    std::string host_path() const { return host_ ? host_->path() : std::string(); }
    std::string last_error() const {
        const char* raw = deep_ep_nvshmem_last_error();
        return raw ? raw : "";
    }
    template <class Fn, class... Args>
    void check(const char* name, Fn fn, Args... args) const {
        call_checked(name, deep_ep_nvshmem_last_error, fn, args...);
    }

#define DEEP_EP_DECLARE(name) decltype(&::name) name = nullptr;
    DEEP_EP_NVSHMEM_FUNCTIONS(DEEP_EP_DECLARE)
#undef DEEP_EP_DECLARE

private:
    static std::unique_ptr<Library> open_host(const std::string& host_library) {
        if (host_library.empty()) return nullptr;
        return std::make_unique<Library>(host_library, RTLD_NOW | RTLD_GLOBAL);
    }

    std::unique_ptr<Library> host_;  // opened first (RTLD_GLOBAL): libdeep_ep_nvshmem.so needs its symbols
    Library lib_;
};

PyObject* g_core_error = nullptr;

}  // namespace
}  // namespace deep_ep_binding

PYBIND11_MODULE(_nvshmem_binding, m) {
    using namespace deep_ep_binding;
    m.doc() = "pybind11 binding of deep_ep's NVSHMEM library (libdeep_ep_nvshmem.so, csrc/deep_ep_ll.h).";
    py::module_ core = py::module_::import("deep_ep._core_binding");  // LLCall, InternodeCall, CoreError
    g_core_error = core.attr("CoreError").ptr();
    Py_INCREF(g_core_error);
    PyObject* library_error = core.attr("LibraryError").ptr();
    Py_INCREF(library_error);
    static PyObject* s_library_error = library_error;
    m.attr("CoreError") = core.attr("CoreError");
    m.attr("LibraryError") = core.attr("LibraryError");
    py::register_local_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const CoreError& e) {
            PyErr_SetString(g_core_error, e.what());
        } catch (const LibraryError& e) {
            PyErr_SetString(s_library_error, e.what());
        }
    });

    py::class_<Nvshmem, std::shared_ptr<Nvshmem>>(m, "Nvshmem", "libdeep_ep_nvshmem.so opened from one path (`open`).")
        .def_property_readonly("path", &Nvshmem::path)
        .def_property_readonly("host_path", &Nvshmem::host_path, "The NVSHMEM host library loaded before it.")
        .def("last_error", &Nvshmem::last_error)
        .def("abi_version", [](const Nvshmem& n) { return n.deep_ep_nvshmem_abi_version(); })
        .def("call_bytes", [](const Nvshmem& n) { return n.deep_ep_nvshmem_call_bytes(); })
        .def("internode_call_bytes", [](const Nvshmem& n) { return n.deep_ep_nvshmem_internode_call_bytes(); })
        .def("uniqueid_bytes", [](const Nvshmem& n) { return n.deep_ep_nvshmem_uniqueid_bytes(); })
        .def("get_uniqueid", [](const Nvshmem& n) {
                const int size = n.deep_ep_nvshmem_uniqueid_bytes();
                std::vector<char> buf(size > 0 ? size : 0);
                n.check("deep_ep_nvshmem_get_uniqueid", n.deep_ep_nvshmem_get_uniqueid, static_cast<void*>(buf.data()));
                return py::bytes(buf.data(), buf.size());
            }, "Rank 0: a fresh NVSHMEM unique id (uniqueid_bytes() bytes).")
        .def("init", [](const Nvshmem& n, const py::bytes& uniqueid, int rank, int num_ranks, int device) {
                std::string uid = uniqueid;
                if (static_cast<int>(uid.size()) != n.deep_ep_nvshmem_uniqueid_bytes())
                    throw py::value_error("init: uniqueid must be uniqueid_bytes() bytes, got " +
                                          std::to_string(uid.size()));
                n.check("deep_ep_nvshmem_init", n.deep_ep_nvshmem_init, static_cast<const void*>(uid.data()), rank,
                        num_ranks, device);
            }, py::arg("uniqueid"), py::arg("rank"), py::arg("num_ranks"), py::arg("device"),
            "nvshmemx_init_attr with the unique id (GIL released while it waits for the other PEs).")
        .def("alloc", [](const Nvshmem& n, int64_t bytes) {
                uint64_t ptr = 0;
                n.check("deep_ep_nvshmem_alloc", n.deep_ep_nvshmem_alloc, bytes, &ptr);
                return ptr;
            }, py::arg("bytes"), "nvshmem_align(128, bytes), zeroed, then a barrier of all PEs; the address.")
        .def("free", [](const Nvshmem& n, uint64_t ptr) {
                n.check("deep_ep_nvshmem_free", n.deep_ep_nvshmem_free, ptr);
            }, py::arg("ptr"))
        .def("barrier", [](const Nvshmem& n) { n.check("deep_ep_nvshmem_barrier", n.deep_ep_nvshmem_barrier); })
        .def("finalize", [](const Nvshmem& n) { n.check("deep_ep_nvshmem_finalize", n.deep_ep_nvshmem_finalize); })
        .def("info", [](const Nvshmem& n) {
                int status = 0, pe = 0, n_pes = 0;
                n.check("deep_ep_nvshmem_info", n.deep_ep_nvshmem_info, &status, &pe, &n_pes);
                return py::make_tuple(status, pe, n_pes);
            }, "(nvshmemx_init_status(), my PE, number of PEs).")
        .def("ll_send", [](const Nvshmem& n, const deep_ep_ll_call& call, uint64_t stream) {
                n.check("deep_ep_nvshmem_ll_send", n.deep_ep_nvshmem_ll_send, &call, stream);
            }, py::arg("call"), py::arg("stream"))
        .def("internode_launch", [](const Nvshmem& n, const deep_ep_internode_call& call, uint64_t stream) {
                n.check("deep_ep_nvshmem_internode_launch", n.deep_ep_nvshmem_internode_launch,
                        static_cast<const void*>(&call), stream);
            }, py::arg("call"), py::arg("stream"));

    m.def("open", [](const std::string& path, const std::string& host_library) {
              return std::make_shared<Nvshmem>(path, host_library);
          }, py::arg("path"), py::arg("host_library"),
          "Load NVSHMEM's host library (RTLD_GLOBAL; \"\" = none, for a build over a stand-in), then open "
          "libdeep_ep_nvshmem.so. Raises LibraryError.");
}

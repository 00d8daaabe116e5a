/* Shared pieces of deep_ep's pybind11 modules (csrc/python/core_binding.cpp, nvshmem_binding.cpp).
 *
 * The modules are compiled by g++ against the C headers of csrc/ only (no torch, no CUDA headers): a
 * tensor crosses as an integer device pointer (`tensor.data_ptr()`, or None for NULL) plus its sizes,
 * a stream as the integer `torch.cuda.Stream.cuda_stream`. Each module opens its compiled library with
 * dlopen() at a path Python chooses (deep_ep/_core.py: the default build next to the package, or
 * DEEP_EP_CORE_LIB), and takes every entry point's type from the header (decltype of the declaration),
 * so a signature change in the header is a compile error here, not a silent ctypes mismatch.
 *
 * Error model: a C entry point returns non-zero and leaves a thread-local message; the module raises
 * deep_ep._core_binding.CoreError("<function>: <message>"). The GIL is released around every call into
 * a library (waits, synchronisation, kernel launches), and the message is read on the same thread.
 */
#pragma once

#include <dlfcn.h>

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

namespace py = pybind11;

namespace deep_ep_binding {

/* A failing call into a compiled library (Python: deep_ep._core_binding.CoreError, a RuntimeError). */
struct CoreError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

/* The library could not be opened or lacks an entry point (Python: deep_ep._core_binding.LibraryError,
 * an OSError). */
struct LibraryError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

/* A raw address: an int or None (NULL) in Python. */
struct Ptr {
    std::uintptr_t value = 0;
    template <class T>
    operator T*() const { return reinterpret_cast<T*>(value); }
};

/* A dlopen()ed library; never closed (a CUDA runtime linked into it keeps threads and static state). */
class Library {
public:
    Library(const std::string& path, int flags) : path_(path) {
        handle_ = dlopen(path.c_str(), flags);
        if (handle_ == nullptr) {
            const char* why = dlerror();
            throw LibraryError("cannot open " + path + ": " + (why ? why : "unknown dlopen error"));
        }
    }
    template <class F>
    F symbol(const char* name) const {
        dlerror();
        void* p = dlsym(handle_, name);
        if (p == nullptr)
            throw LibraryError(path_ + " has no symbol " + name +
                               " (a library from another version of deep_ep: rebuild with `python build_core.py`)");
        return reinterpret_cast<F>(p);
    }
    const std::string& path() const { return path_; }

private:
    std::string path_;
    void* handle_ = nullptr;
};

/* Call `fn(args...)` without the GIL; raise CoreError("<name>: <last_error()>") when it returns non-zero. */
template <class LastError, class Fn, class... Args>
void call_checked(const char* name, LastError last_error, Fn fn, Args... args) {
    int rc;
    std::string message;
    {
        py::gil_scoped_release nogil;
        rc = fn(args...);
        if (rc != 0) {
            const char* raw = last_error();
            message = raw ? raw : "unknown error";
        }
    }
    if (rc != 0) throw CoreError(std::string(name) + ": " + message);
}

/* ------------------------------------------------------------------------------ C struct binding
 * A plain C struct (deep_ep_ll_call, deep_ep_internode_call) as a Python class with one property per
 * field. The field list is generated from the header at build time (build_core.py writes
 * deep_ep_struct_fields.h), so the class follows the header: integers as int, pointers as int (None
 * stores NULL), fixed arrays as a live view (`call.nvl_peers[j] = ptr`, or assign a whole sequence). */

enum class Kind { kInt, kPtr };

template <class T>
constexpr Kind kind_of() { return std::is_pointer_v<T> ? Kind::kPtr : Kind::kInt; }

template <class T>
py::object to_py(const T& v) {
    if constexpr (std::is_pointer_v<T>)
        return py::int_(reinterpret_cast<std::uintptr_t>(v));
    else
        return py::int_(v);
}

template <class T>
T from_py(py::handle h, const char* name) {
    try {
        if constexpr (std::is_pointer_v<T>) {
            if (h.is_none()) return nullptr;
            return reinterpret_cast<T>(h.cast<std::uintptr_t>());
        } else {
            return h.cast<T>();
        }
    } catch (const py::cast_error&) {
        throw py::type_error(std::string("field ") + name + ": expected " +
                             (std::is_pointer_v<T> ? "an address (int) or None" : "an int in the field's range") +
                             ", got " + std::string(py::str(py::type::of(h))));
    }
}

/* A live view of a fixed array field: indexing reads/writes the struct's memory. */
class FieldArray {
public:
    FieldArray(py::object owner, void* data, std::size_t n, std::size_t elem_size, bool is_ptr, bool is_signed,
               std::string name)
        : owner_(std::move(owner)), data_(data), n_(n), elem_size_(elem_size), is_ptr_(is_ptr),
          is_signed_(is_signed), name_(std::move(name)) {}

    std::size_t size() const { return n_; }

    py::object get(std::ptrdiff_t i) const {
        char* p = static_cast<char*>(data_) + index(i) * elem_size_;
        if (is_ptr_) return py::int_(*reinterpret_cast<std::uintptr_t*>(p));
        switch (elem_size_) {
            case 4: return is_signed_ ? py::int_(*reinterpret_cast<int32_t*>(p)) : py::int_(*reinterpret_cast<uint32_t*>(p));
            case 8: return is_signed_ ? py::int_(*reinterpret_cast<int64_t*>(p)) : py::int_(*reinterpret_cast<uint64_t*>(p));
            default: throw std::logic_error("unsupported array element size");
        }
    }

    void set(std::ptrdiff_t i, py::handle v) {
        char* p = static_cast<char*>(data_) + index(i) * elem_size_;
        const char* n = name_.c_str();
        if (is_ptr_) {
            *reinterpret_cast<void**>(p) = from_py<void*>(v, n);
            return;
        }
        switch (elem_size_) {
            case 4:
                if (is_signed_) *reinterpret_cast<int32_t*>(p) = from_py<int32_t>(v, n);
                else *reinterpret_cast<uint32_t*>(p) = from_py<uint32_t>(v, n);
                return;
            case 8:
                if (is_signed_) *reinterpret_cast<int64_t*>(p) = from_py<int64_t>(v, n);
                else *reinterpret_cast<uint64_t*>(p) = from_py<uint64_t>(v, n);
                return;
            default: throw std::logic_error("unsupported array element size");
        }
    }

    void assign(const py::sequence& values) {
        if (values.size() != n_)
            throw py::value_error("field " + name_ + " has " + std::to_string(n_) + " elements, got " +
                                  std::to_string(values.size()));
        for (std::size_t i = 0; i < n_; ++i) set(static_cast<std::ptrdiff_t>(i), values[i]);
    }

    py::list to_list() const {
        py::list out;
        for (std::size_t i = 0; i < n_; ++i) out.append(get(static_cast<std::ptrdiff_t>(i)));
        return out;
    }

private:
    std::size_t index(std::ptrdiff_t i) const {
        if (i < 0) i += static_cast<std::ptrdiff_t>(n_);
        if (i < 0 || i >= static_cast<std::ptrdiff_t>(n_)) throw py::index_error(name_ + ": index out of range");
        return static_cast<std::size_t>(i);
    }

    py::object owner_;  // keeps the struct alive
    void* data_;
    std::size_t n_, elem_size_;
    bool is_ptr_, is_signed_;
    std::string name_;
};

inline void bind_field_array(py::module_& m) {
    py::class_<FieldArray>(m, "FieldArray", "A live view of a fixed-size array field of a C struct.")
        .def("__len__", &FieldArray::size)
        .def("__getitem__", &FieldArray::get)
        .def("__setitem__", &FieldArray::set)
        .def("__iter__", [](const FieldArray& a) { return py::iter(a.to_list()); })
        .def("__eq__", [](const FieldArray& a, const py::sequence& other) { return a.to_list().equal(py::list(other)); },
             py::is_operator())
        .def("__repr__", [](const FieldArray& a) { return std::string(py::repr(a.to_list())); });
}

template <class S, class F>
void bind_field(py::class_<S>& cls, const char* name, F S::*member) {
    if constexpr (std::is_array_v<F>) {
        using E = std::remove_extent_t<F>;
        static_assert(std::rank_v<F> == 1, "only one-dimensional array fields");
        cls.def_property(
            name,
            [member, name](py::object self) {
                S& s = self.cast<S&>();
                return FieldArray(self, static_cast<void*>(&(s.*member)[0]), std::extent_v<F>, sizeof(E),
                                  std::is_pointer_v<E>, std::is_signed_v<E>, name);
            },
            [member, name](py::object self, const py::sequence& values) {
                S& s = self.cast<S&>();
                FieldArray(self, static_cast<void*>(&(s.*member)[0]), std::extent_v<F>, sizeof(E),
                           std::is_pointer_v<E>, std::is_signed_v<E>, name)
                    .assign(values);
            });
    } else {
        static_assert(std::is_pointer_v<F> || std::is_integral_v<F> || std::is_enum_v<F>,
                      "struct fields must be integers, pointers or arrays of them");
        cls.def_property(
            name, [member](const S& s) { return to_py<F>(s.*member); },
            [member, name](S& s, py::handle v) { s.*member = from_py<F>(v, name); });
    }
}

}  // namespace deep_ep_binding

namespace pybind11 {
namespace detail {

/* deep_ep_binding::Ptr <- int (an address) or None (NULL). */
template <>
struct type_caster<deep_ep_binding::Ptr> {
    PYBIND11_TYPE_CASTER(deep_ep_binding::Ptr, const_name("int | None"));

    bool load(handle src, bool) {
        if (src.is_none()) {
            value.value = 0;
            return true;
        }
        if (!PyLong_Check(src.ptr()) || PyBool_Check(src.ptr())) return false;
        unsigned long long v = PyLong_AsUnsignedLongLong(src.ptr());
        if (v == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
            PyErr_Clear();
            return false;
        }
        value.value = static_cast<std::uintptr_t>(v);
        return true;
    }

    static handle cast(deep_ep_binding::Ptr src, return_value_policy, handle) {
        return PyLong_FromUnsignedLongLong(src.value);
    }
};

}  // namespace detail
}  // namespace pybind11

// Emulated build: stands in for CUDA's cuda_runtime.h (found first on the include path). The CUDA
// toolkit's own cuda_runtime_api.h supplies the types and declarations; runtime_emu.cpp defines the
// functions the deep_ep runtime calls, so the library needs neither libcudart nor a GPU.
#pragma once

#include <cuda_runtime_api.h>
#include <vector_functions.h>

// The C++ template overload of cuda_runtime.h, for kernel function pointers.
template <typename T>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* num_blocks, T func, int block_size,
                                                                 size_t dynamic_smem) {
    return ::cudaOccupancyMaxActiveBlocksPerMultiprocessor(num_blocks, reinterpret_cast<const void*>(func), block_size,
                                                           dynamic_smem);
}

// Row copy helpers shared by the compact and scatter kernels (internal header).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace qtale {

// Copy one row of `words` elements of type W with the whole block.
template <typename W>
__device__ __forceinline__ void copyRow(W* __restrict__ dst, const W* __restrict__ src, int64_t words)
{
    for (int64_t k = threadIdx.x; k < words; k += blockDim.x)
    {
        dst[k] = src[k];
    }
}

// Widest copy word (16, 8, 4 or 2 bytes) that divides the row and the alignment of every base pointer.
inline int copyWordBytes(int64_t rowBytes, const void* a, const void* b)
{
    const uintptr_t misalign = reinterpret_cast<uintptr_t>(a) | reinterpret_cast<uintptr_t>(b);
    for (int w : {16, 8, 4})
    {
        if (rowBytes % w == 0 && misalign % w == 0)
        {
            return w;
        }
    }
    return 2;
}

constexpr int kCopyThreads = 256;
// Grid-stride over rows: enough blocks to fill any current GPU, few enough that idle
// blocks (rows beyond the data-dependent N) exit immediately.
constexpr int64_t kMaxRowBlocks = 2048;

} // namespace qtale

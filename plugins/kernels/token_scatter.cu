// TokenScatter kernel: out = residual, then the first count[b] compacted rows go back to index[b, i].
#include "qtale_copy.cuh"
#include "qtale_kernels.h"

#include <algorithm>

namespace qtale {
namespace {

template <typename W>
__global__ void scatterKernel(const W* __restrict__ update, const int32_t* __restrict__ index,
    const int32_t* __restrict__ count, int64_t tokens, int64_t n, int64_t rowWords, W* __restrict__ out)
{
    const int64_t b = blockIdx.y;
    const int64_t used = min(static_cast<int64_t>(count[b]), n);
    for (int64_t i = blockIdx.x; i < used; i += gridDim.x)
    {
        const int64_t dst = index[b * n + i];
        if (dst < 0 || dst >= tokens)
        {
            continue; // cannot raise on the device; the reference rejects this input
        }
        copyRow(out + (b * tokens + dst) * rowWords, update + (b * n + i) * rowWords, rowWords);
    }
}

template <typename W>
void launchScatter(const void* update, const int32_t* index, const int32_t* count, int64_t batch, int64_t tokens,
    int64_t n, int64_t rowBytes, void* out, cudaStream_t stream)
{
    const dim3 grid(static_cast<unsigned>(std::min<int64_t>(n, kMaxRowBlocks)), static_cast<unsigned>(batch));
    scatterKernel<W><<<grid, kCopyThreads, 0, stream>>>(static_cast<const W*>(update), index, count, tokens, n,
        rowBytes / static_cast<int64_t>(sizeof(W)), static_cast<W*>(out));
}

} // namespace
} // namespace qtale

extern "C" cudaError_t qtale_token_scatter(const void* residual, const void* update, const int32_t* index,
    const int32_t* count, int64_t batch, int64_t tokens, int64_t n, int64_t hidden_size, int dtype, void* out,
    cudaStream_t stream)
{
    const size_t elem = qtale_dtype_size(dtype);
    if (elem == 0 || batch < 0 || batch > 65535 || tokens < 0 || n < 0 || hidden_size <= 0 || residual == nullptr
        || out == nullptr || (n > 0 && (update == nullptr || index == nullptr || count == nullptr)))
    {
        return cudaErrorInvalidValue;
    }
    const int64_t rowBytes = hidden_size * static_cast<int64_t>(elem);
    if (out != residual && batch * tokens > 0)
    {
        const cudaError_t err = cudaMemcpyAsync(
            out, residual, static_cast<size_t>(batch * tokens * rowBytes), cudaMemcpyDeviceToDevice, stream);
        if (err != cudaSuccess)
        {
            return err;
        }
    }
    if (batch == 0 || n == 0 || tokens == 0)
    {
        return cudaSuccess;
    }
    switch (qtale::copyWordBytes(rowBytes, update, out))
    {
    case 16: qtale::launchScatter<uint4>(update, index, count, batch, tokens, n, rowBytes, out, stream); break;
    case 8: qtale::launchScatter<uint2>(update, index, count, batch, tokens, n, rowBytes, out, stream); break;
    case 4: qtale::launchScatter<uint32_t>(update, index, count, batch, tokens, n, rowBytes, out, stream); break;
    default: qtale::launchScatter<uint16_t>(update, index, count, batch, tokens, n, rowBytes, out, stream); break;
    }
    return cudaGetLastError();
}

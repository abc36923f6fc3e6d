// TokenCompact kernels: per-row stable partition (block-level scan) + row gather.
//
// Two launches, no host synchronisation:
//   1. partitionKernel, one block per batch row: counts the executed tokens and writes the stable
//      partition of 0..T-1 (executed ascending, then skipped ascending) into an int32 workspace [B,T].
//   2. gatherKernel: every block derives N = max(1, max_b count[b]) from the B counts (B is small, so
//      this is cheaper than another launch), then copies the first N partition entries of each row into
//      index [B,N] and the matching hidden rows into compact [B,N,H]. Outputs are packed with the actual
//      N, which only the device knows; this is what a TensorRT size-tensor output requires.
#include "qtale_copy.cuh"
#include "qtale_kernels.h"

#include <algorithm>

namespace qtale {
namespace {

constexpr int kScanThreads = 1024; // 32 warps; T is processed in tiles of this many tokens
constexpr int kWarps = kScanThreads / 32;

// Exclusive prefix sum of `flag` over the block; returns this thread's prefix and the tile total.
// Warp ballots give the in-warp prefix; warp 0 scans the 32 warp totals with shuffles.
__device__ __forceinline__ int blockExclusiveScan(int flag, int* warpSums, int& tileTotal)
{
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const unsigned ballot = __ballot_sync(0xffffffffu, flag);
    const int lanePrefix = __popc(ballot & ((1u << lane) - 1u));
    if (lane == 0)
    {
        warpSums[warp] = __popc(ballot);
    }
    __syncthreads();
    if (warp == 0)
    {
        int v = lane < kWarps ? warpSums[lane] : 0;
        for (int offset = 1; offset < 32; offset <<= 1)
        {
            const int up = __shfl_up_sync(0xffffffffu, v, offset);
            v += lane >= offset ? up : 0;
        }
        warpSums[lane] = v; // inclusive scan of warp totals
    }
    __syncthreads();
    const int result = (warp > 0 ? warpSums[warp - 1] : 0) + lanePrefix;
    tileTotal = warpSums[kWarps - 1];
    __syncthreads(); // warpSums is reused by the next tile
    return result;
}

__global__ void __launch_bounds__(kScanThreads)
    partitionKernel(const int32_t* __restrict__ gate, int64_t tokens, int32_t* __restrict__ perm,
        int32_t* __restrict__ count)
{
    __shared__ int warpSums[32];
    const int64_t b = blockIdx.x;
    const int32_t* row = gate + b * tokens;
    int32_t* permRow = perm + b * tokens;

    // Pass 1: executed count of the row (the skipped tokens are placed after all executed ones).
    int64_t total = 0;
    for (int64_t base = 0; base < tokens; base += kScanThreads)
    {
        const int64_t t = base + threadIdx.x;
        int tile = 0;
        blockExclusiveScan(t < tokens && row[t] != 0, warpSums, tile);
        total += tile;
    }
    // Pass 2: scatter each position to its slot in the stable partition.
    int64_t carry = 0;
    for (int64_t base = 0; base < tokens; base += kScanThreads)
    {
        const int64_t t = base + threadIdx.x;
        const int flag = t < tokens && row[t] != 0;
        int tile = 0;
        const int64_t executedBefore = carry + blockExclusiveScan(flag, warpSums, tile);
        if (t < tokens)
        {
            // A skipped token's rank among skipped tokens is t - (executed tokens before t).
            const int64_t slot = flag ? executedBefore : total + (t - executedBefore);
            permRow[slot] = static_cast<int32_t>(t);
        }
        carry += tile;
    }
    if (threadIdx.x == 0)
    {
        count[b] = static_cast<int32_t>(total); // total <= T <= INT32_MAX (checked by the entry point)
    }
}

__device__ __forceinline__ int32_t deviceN(const int32_t* count, int64_t batch)
{
    int32_t m = 1;
    for (int64_t b = 0; b < batch; ++b)
    {
        m = max(m, count[b]);
    }
    return m;
}

template <typename W>
__global__ void gatherKernel(const W* __restrict__ hidden, const int32_t* __restrict__ perm,
    const int32_t* __restrict__ count, int64_t batch, int64_t tokens, int64_t rowWords, W* __restrict__ compact,
    int32_t* __restrict__ index, int32_t* nOut)
{
    __shared__ int32_t sN;
    if (threadIdx.x == 0)
    {
        sN = deviceN(count, batch);
    }
    __syncthreads();
    const int64_t n = sN;
    const int64_t b = blockIdx.y;
    if (b == 0 && blockIdx.x == 0 && threadIdx.x == 0 && nOut != nullptr)
    {
        *nOut = static_cast<int32_t>(n);
    }
    for (int64_t i = blockIdx.x; i < n; i += gridDim.x)
    {
        const int32_t src = perm[b * tokens + i];
        if (threadIdx.x == 0)
        {
            index[b * n + i] = src;
        }
        copyRow(compact + (b * n + i) * rowWords, hidden + (b * tokens + src) * rowWords, rowWords);
    }
}

__global__ void maxCountKernel(const int32_t* count, int64_t batch, int32_t* nOut)
{
    __shared__ int32_t partial[256];
    int32_t m = 1;
    for (int64_t b = threadIdx.x; b < batch; b += blockDim.x)
    {
        m = max(m, count[b]);
    }
    partial[threadIdx.x] = m;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride >>= 1)
    {
        if (threadIdx.x < stride)
        {
            partial[threadIdx.x] = max(partial[threadIdx.x], partial[threadIdx.x + stride]);
        }
        __syncthreads();
    }
    if (threadIdx.x == 0 && nOut != nullptr)
    {
        *nOut = partial[0];
    }
}

template <typename W>
void launchGather(const void* hidden, const int32_t* perm, const int32_t* count, int64_t batch, int64_t tokens,
    int64_t rowBytes, void* compact, int32_t* index, int32_t* n, cudaStream_t stream)
{
    const dim3 grid(static_cast<unsigned>(std::min<int64_t>(tokens, kMaxRowBlocks)), static_cast<unsigned>(batch));
    gatherKernel<W><<<grid, kCopyThreads, 0, stream>>>(static_cast<const W*>(hidden), perm, count, batch, tokens,
        rowBytes / static_cast<int64_t>(sizeof(W)), static_cast<W*>(compact), index, n);
}

} // namespace
} // namespace qtale

extern "C" {

size_t qtale_dtype_size(int dtype)
{
    switch (dtype)
    {
    case QTALE_FLOAT32: return 4;
    case QTALE_FLOAT16:
    case QTALE_BFLOAT16: return 2;
    default: return 0;
    }
}

size_t qtale_token_compact_workspace_size(int64_t batch, int64_t tokens)
{
    if (batch <= 0 || tokens <= 0)
    {
        return 0;
    }
    const size_t bytes = static_cast<size_t>(batch) * static_cast<size_t>(tokens) * sizeof(int32_t);
    return (bytes + 255) / 256 * 256;
}

cudaError_t qtale_token_compact(const void* hidden, const int32_t* gate, int64_t batch, int64_t tokens,
    int64_t hidden_size, int dtype, void* compact, int32_t* index, int32_t* count, int32_t* n, void* workspace,
    cudaStream_t stream)
{
    const size_t elem = qtale_dtype_size(dtype);
    // int32 partition entries and a 16-bit grid.y bound the problem size.
    if (elem == 0 || batch < 0 || batch > 65535 || tokens <= 0 || tokens > INT32_MAX || hidden_size <= 0
        || hidden == nullptr || gate == nullptr || compact == nullptr || index == nullptr || count == nullptr
        || workspace == nullptr)
    {
        return cudaErrorInvalidValue;
    }
    if (batch == 0)
    {
        // No rows: N is 1 by definition; only the scalar output has content.
        return qtale_compute_n_device(count, 0, n, stream);
    }
    auto* perm = static_cast<int32_t*>(workspace);
    qtale::partitionKernel<<<static_cast<unsigned>(batch), qtale::kScanThreads, 0, stream>>>(gate, tokens, perm, count);
    const int64_t rowBytes = hidden_size * static_cast<int64_t>(elem);
    switch (qtale::copyWordBytes(rowBytes, hidden, compact))
    {
    case 16: qtale::launchGather<uint4>(hidden, perm, count, batch, tokens, rowBytes, compact, index, n, stream); break;
    case 8: qtale::launchGather<uint2>(hidden, perm, count, batch, tokens, rowBytes, compact, index, n, stream); break;
    case 4: qtale::launchGather<uint32_t>(hidden, perm, count, batch, tokens, rowBytes, compact, index, n, stream); break;
    default: qtale::launchGather<uint16_t>(hidden, perm, count, batch, tokens, rowBytes, compact, index, n, stream); break;
    }
    return cudaGetLastError();
}

int32_t qtale_compute_n_host(const int32_t* count, int64_t batch)
{
    int32_t n = 1;
    for (int64_t b = 0; b < batch; ++b)
    {
        n = std::max(n, count[b]);
    }
    return n;
}

cudaError_t qtale_compute_n_device(const int32_t* count, int64_t batch, int32_t* n, cudaStream_t stream)
{
    if (batch < 0 || (batch > 0 && count == nullptr))
    {
        return cudaErrorInvalidValue;
    }
    qtale::maxCountKernel<<<1, 256, 0, stream>>>(count, batch, n);
    return cudaGetLastError();
}

} // extern "C"

// C ABI of the QTALE token-compaction kernels (TokenCompact / TokenScatter, docs/ops.md).
//
// All tensors are dense row-major device buffers. Element types of hidden/update/out are
// identified only by their size (the kernels move bits, they never do arithmetic), so
// fp32, fp16 and bf16 share one code path. Every entry point is asynchronous on `stream`
// and never synchronises with the host.
#pragma once

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#define QTALE_API __declspec(dllexport)
#else
#define QTALE_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

// Element type of the float tensors.
enum qtale_dtype { QTALE_FLOAT32 = 0, QTALE_FLOAT16 = 1, QTALE_BFLOAT16 = 2 };

// Bytes per element of `dtype`, or 0 if unknown.
QTALE_API size_t qtale_dtype_size(int dtype);

// Device scratch needed by qtale_token_compact for a [batch, tokens] gate (bytes, 256-aligned).
QTALE_API size_t qtale_token_compact_workspace_size(int64_t batch, int64_t tokens);

// TokenCompact. Inputs: hidden [B,T,H] (dtype), gate [B,T] int32 (nonzero = execute).
// Outputs, all on device and all int32 (the types TensorRT 10 documents for plugin I/O and size tensors):
//   count [B]; n (N = max(1, max_b count[b])) [0-D]; index [B,N] and compact [B,N,H] packed with the
//   *actual* N. N is only known on the device, so callers size index for B*T and compact for B*T*H
//   elements (T is the upper bound of N).
QTALE_API cudaError_t qtale_token_compact(const void* hidden, const int32_t* gate, int64_t batch, int64_t tokens,
    int64_t hidden_size, int dtype, void* compact, int32_t* index, int32_t* count, int32_t* n, void* workspace,
    cudaStream_t stream);

// TokenScatter: out = residual; out[b, index[b,i], :] = update[b, i, :] for i < min(count[b], N).
// residual/out [B,T,H], update [B,N,H], index [B,N] int32, count [B] int32. `out` may alias `residual`
// (then no copy is made). Indices outside [0, T) are skipped (the reference raises instead).
QTALE_API cudaError_t qtale_token_scatter(const void* residual, const void* update, const int32_t* index,
    const int32_t* count, int64_t batch, int64_t tokens, int64_t n, int64_t hidden_size, int dtype, void* out,
    cudaStream_t stream);

// N = max(1, max_b count[b]) from a host array (for hosts that already copied count back).
QTALE_API int32_t qtale_compute_n_host(const int32_t* count, int64_t batch);

// Same reduction on the device: reads count [B] (device), writes n (device).
QTALE_API cudaError_t qtale_compute_n_device(const int32_t* count, int64_t batch, int32_t* n, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

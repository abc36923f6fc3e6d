// GPU test of the QTALE kernels against a plain CPU loop (docs/ops.md semantics).
// Exit code 0 = all cases passed, 1 = a mismatch or CUDA error, 2 = no usable CUDA device.
// Cases are generated deterministically; the data is random bits because the kernels only move data.
#include "qtale_kernels.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace {

struct Case
{
    const char* name;
    int64_t batch, tokens, hidden;
    int dtype;
    double executeProb; // per-token probability; <0 means "row b executes b*tokens/batch tokens"
};

#define CHECK_CUDA(call)                                                                                    \
    do                                                                                                       \
    {                                                                                                        \
        const cudaError_t e_ = (call);                                                                       \
        if (e_ != cudaSuccess)                                                                               \
        {                                                                                                    \
            std::fprintf(stderr, "CUDA error %s at %s:%d: %s\n", cudaGetErrorName(e_), __FILE__, __LINE__, #call); \
            return false;                                                                                    \
        }                                                                                                    \
    } while (0)

template <typename T>
struct DeviceBuffer
{
    T* ptr = nullptr;
    explicit DeviceBuffer(size_t n) { cudaMalloc(&ptr, std::max<size_t>(n, 1) * sizeof(T)); }
    ~DeviceBuffer() { cudaFree(ptr); }
};

bool runCase(const Case& c, std::mt19937_64& rng)
{
    const size_t elem = qtale_dtype_size(c.dtype);
    const int64_t B = c.batch, T = c.tokens, H = c.hidden;
    const size_t rowBytes = static_cast<size_t>(H) * elem;

    // Gate and hidden on the host.
    std::vector<int32_t> gate(B * T);
    std::bernoulli_distribution coin(std::max(0.0, c.executeProb));
    for (int64_t b = 0; b < B; ++b)
    {
        for (int64_t t = 0; t < T; ++t)
        {
            gate[b * T + t] = c.executeProb < 0 ? (t < b * T / std::max<int64_t>(B, 1) ? 1 : 0) : (coin(rng) ? 1 : 0);
        }
    }
    if (c.executeProb < 0)
    {
        for (int64_t b = 0; b < B; ++b)
        {
            std::shuffle(gate.begin() + b * T, gate.begin() + (b + 1) * T, rng);
        }
    }
    std::vector<uint8_t> hidden(B * T * rowBytes), residual(B * T * rowBytes);
    for (auto& x : hidden) x = static_cast<uint8_t>(rng());
    for (auto& x : residual) x = static_cast<uint8_t>(rng());

    // CPU loop reference.
    std::vector<int32_t> count(B, 0);
    int32_t n = 1;
    std::vector<std::vector<int64_t>> order(B);
    for (int64_t b = 0; b < B; ++b)
    {
        for (int64_t t = 0; t < T; ++t)
            if (gate[b * T + t]) order[b].push_back(t);
        count[b] = static_cast<int32_t>(order[b].size());
        for (int64_t t = 0; t < T; ++t)
            if (!gate[b * T + t]) order[b].push_back(t);
        n = std::max(n, count[b]);
    }
    std::vector<int32_t> wantIndex(B * n);
    std::vector<uint8_t> wantCompact(B * n * rowBytes);
    for (int64_t b = 0; b < B; ++b)
        for (int64_t i = 0; i < n; ++i)
        {
            wantIndex[b * n + i] = static_cast<int32_t>(order[b][i]);
            std::memcpy(&wantCompact[(b * n + i) * rowBytes], &hidden[(b * T + order[b][i]) * rowBytes], rowBytes);
        }
    // Scatter the compacted rows (as "update") back into the residual.
    std::vector<uint8_t> update(B * n * rowBytes);
    for (auto& x : update) x = static_cast<uint8_t>(rng());
    std::vector<uint8_t> wantOut = residual;
    for (int64_t b = 0; b < B; ++b)
        for (int64_t i = 0; i < count[b]; ++i)
            std::memcpy(&wantOut[(b * T + wantIndex[b * n + i]) * rowBytes], &update[(b * n + i) * rowBytes], rowBytes);

    // Device run. Outputs sized for the upper bound N = T, as a TensorRT engine does.
    DeviceBuffer<uint8_t> dHidden(B * T * rowBytes), dCompact(B * T * rowBytes);
    DeviceBuffer<int32_t> dGate(B * T), dIndex(B * T), dCount(B), dN(1), dN2(1);
    DeviceBuffer<uint8_t> dWork(qtale_token_compact_workspace_size(B, T));
    DeviceBuffer<uint8_t> dResidual(B * T * rowBytes), dUpdate(B * n * rowBytes), dOut(B * T * rowBytes);
    CHECK_CUDA(cudaMemcpy(dHidden.ptr, hidden.data(), hidden.size(), cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMemcpy(dGate.ptr, gate.data(), gate.size() * sizeof(int32_t), cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMemcpy(dResidual.ptr, residual.data(), residual.size(), cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMemcpy(dUpdate.ptr, update.data(), update.size(), cudaMemcpyHostToDevice));
    cudaStream_t stream;
    CHECK_CUDA(cudaStreamCreate(&stream));
    CHECK_CUDA(qtale_token_compact(dHidden.ptr, dGate.ptr, B, T, H, c.dtype, dCompact.ptr, dIndex.ptr, dCount.ptr,
        dN.ptr, dWork.ptr, stream));
    CHECK_CUDA(qtale_compute_n_device(dCount.ptr, B, dN2.ptr, stream));
    CHECK_CUDA(qtale_token_scatter(dResidual.ptr, dUpdate.ptr, dIndex.ptr, dCount.ptr, B, T, n, H, c.dtype, dOut.ptr, stream));
    // In-place variant (out aliases residual), as used for the KV-cache scatter.
    CHECK_CUDA(qtale_token_scatter(dResidual.ptr, dUpdate.ptr, dIndex.ptr, dCount.ptr, B, T, n, H, c.dtype, dResidual.ptr, stream));
    CHECK_CUDA(cudaStreamSynchronize(stream));
    CHECK_CUDA(cudaStreamDestroy(stream));

    int32_t gotN = 0, gotN2 = 0;
    std::vector<int32_t> gotCount(B), gotIndex(B * n);
    std::vector<uint8_t> gotCompact(B * n * rowBytes), gotOut(B * T * rowBytes), gotInPlace(B * T * rowBytes);
    CHECK_CUDA(cudaMemcpy(&gotN, dN.ptr, sizeof(gotN), cudaMemcpyDeviceToHost));
    CHECK_CUDA(cudaMemcpy(&gotN2, dN2.ptr, sizeof(gotN2), cudaMemcpyDeviceToHost));
    CHECK_CUDA(cudaMemcpy(gotCount.data(), dCount.ptr, B * sizeof(int32_t), cudaMemcpyDeviceToHost));
    CHECK_CUDA(cudaMemcpy(gotIndex.data(), dIndex.ptr, B * n * sizeof(int32_t), cudaMemcpyDeviceToHost));
    CHECK_CUDA(cudaMemcpy(gotCompact.data(), dCompact.ptr, gotCompact.size(), cudaMemcpyDeviceToHost));
    CHECK_CUDA(cudaMemcpy(gotOut.data(), dOut.ptr, gotOut.size(), cudaMemcpyDeviceToHost));
    CHECK_CUDA(cudaMemcpy(gotInPlace.data(), dResidual.ptr, gotInPlace.size(), cudaMemcpyDeviceToHost));

    std::string failed;
    if (gotN != n || gotN2 != n || qtale_compute_n_host(count.data(), B) != n) failed += " n";
    if (gotCount != count) failed += " count";
    if (gotIndex != wantIndex) failed += " index";
    if (gotCompact != wantCompact) failed += " compact";
    if (gotOut != wantOut) failed += " scatter";
    if (gotInPlace != wantOut) failed += " scatter_in_place";
    std::printf("%-28s B=%lld T=%lld H=%lld N=%lld %s%s\n", c.name, static_cast<long long>(B),
        static_cast<long long>(T), static_cast<long long>(H), static_cast<long long>(n),
        failed.empty() ? "ok" : "FAILED:", failed.c_str());
    return failed.empty();
}

} // namespace

int main()
{
    int devices = 0;
    if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0)
    {
        std::fprintf(stderr, "no CUDA device\n");
        return 2;
    }
    const Case cases[] = {
        {"none_fp32", 2, 5, 3, QTALE_FLOAT32, 0.0},
        {"all_fp32", 3, 7, 4, QTALE_FLOAT32, 1.0},
        {"some_fp32", 4, 33, 64, QTALE_FLOAT32, 0.5},
        {"single_token_fp16", 3, 1, 8, QTALE_FLOAT16, 0.5},
        {"odd_width_fp16", 2, 77, 3, QTALE_FLOAT16, 0.3},
        {"staggered_counts_bf16", 5, 1000, 128, QTALE_BFLOAT16, -1.0},
        {"long_8192_fp16", 2, 8192, 256, QTALE_FLOAT16, 0.6},
        {"long_8192_bf16", 3, 8192, 64, QTALE_BFLOAT16, -1.0},
        {"long_9000_fp32", 1, 9000, 33, QTALE_FLOAT32, 0.9},
        {"wide_fp16", 2, 64, 4096, QTALE_FLOAT16, 0.4},
    };
    std::mt19937_64 rng(1234);
    bool ok = true;
    for (const Case& c : cases)
    {
        ok = runCase(c, rng) && ok;
    }
    // Argument validation must reject unknown dtypes without touching memory.
    if (qtale_token_compact(nullptr, nullptr, 1, 1, 1, 7, nullptr, nullptr, nullptr, nullptr, nullptr, 0)
        != cudaErrorInvalidValue)
    {
        std::printf("argument validation FAILED\n");
        ok = false;
    }
    std::printf("%s\n", ok ? "ALL PASSED" : "SOME FAILED");
    return ok ? 0 : 1;
}

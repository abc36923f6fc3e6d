// TensorRT plugin for qtale::TokenScatter(residual, update, index, count) -> out. See docs/ops.md.
#pragma once

#include "qtale_trt_common.h"

namespace qtale {
namespace trt {

class TokenScatterPlugin final : public PluginBase
{
public:
    static constexpr char const* kName = "TokenScatter";
    enum Input : int32_t { kRESIDUAL = 0, kUPDATE = 1, kINDEX = 2, kCOUNT = 3 };

    TokenScatterPlugin() = default;
    TokenScatterPlugin(TokenScatterPlugin const&) = default;

    nvinfer1::IPluginV3* clone() noexcept override;
    char const* getPluginName() const noexcept override { return kName; }

    int32_t getNbOutputs() const noexcept override { return 1; }
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
        nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(
        int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept override;

    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;

protected:
    int32_t expectedInputs() const noexcept override { return 4; }
};

} // namespace trt
} // namespace qtale

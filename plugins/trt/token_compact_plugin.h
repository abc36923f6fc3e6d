// TensorRT plugin for qtale::TokenCompact(hidden, gate) -> (compact, index, count, n). See docs/ops.md.
#pragma once

#include "qtale_trt_common.h"

namespace qtale {
namespace trt {

class TokenCompactPlugin final : public PluginBase
{
public:
    static constexpr char const* kName = "TokenCompact";
    enum Output : int32_t { kCOMPACT = 0, kINDEX = 1, kCOUNT = 2, kN = 3 };

    TokenCompactPlugin() = default;
    TokenCompactPlugin(TokenCompactPlugin const&) = default;

    nvinfer1::IPluginV3* clone() noexcept override;
    char const* getPluginName() const noexcept override { return kName; }

    int32_t getNbOutputs() const noexcept override { return 4; }
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
        nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(
        int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;

    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;

protected:
    int32_t expectedInputs() const noexcept override { return 2; }
};

} // namespace trt
} // namespace qtale

#include "token_scatter_plugin.h"

namespace qtale {
namespace trt {

using nvinfer1::DataType;

nvinfer1::IPluginV3* TokenScatterPlugin::clone() noexcept
{
    try
    {
        return new TokenScatterPlugin(*this);
    }
    catch (...)
    {
        logError("qtale: TokenScatter clone failed");
        return nullptr;
    }
}

int32_t TokenScatterPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (nbInputs != 4 || nbOutputs != 1 || !isFloatType(inputTypes[kRESIDUAL]) || inputTypes[kUPDATE] != inputTypes[kRESIDUAL])
    {
        logError("qtale: TokenScatter needs residual and update of the same FP32/FP16/BF16 type");
        return -1;
    }
    outputTypes[0] = inputTypes[kRESIDUAL];
    return 0;
}

int32_t TokenScatterPlugin::getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
    nvinfer1::DimsExprs const* /*shapeInputs*/, int32_t /*nbShapeInputs*/, nvinfer1::DimsExprs* outputs,
    int32_t nbOutputs, nvinfer1::IExprBuilder& /*exprBuilder*/) noexcept
{
    if (nbInputs != 4 || nbOutputs != 1 || inputs[kRESIDUAL].nbDims != 3 || inputs[kUPDATE].nbDims != 3
        || inputs[kINDEX].nbDims != 2 || inputs[kCOUNT].nbDims != 1)
    {
        logError("qtale: TokenScatter needs residual [B,T,H], update [B,N,H], index [B,N], count [B]");
        return -1;
    }
    outputs[0] = inputs[kRESIDUAL];
    return 0;
}

bool TokenScatterPlugin::supportsFormatCombination(
    int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (nbInputs != 4 || nbOutputs != 1 || pos < 0 || pos >= 5)
    {
        return false;
    }
    nvinfer1::PluginTensorDesc const& desc = inOut[pos].desc;
    if (desc.format != nvinfer1::TensorFormat::kLINEAR)
    {
        return false;
    }
    switch (pos)
    {
    case kRESIDUAL: return isFloatType(desc.type);
    case kINDEX:
    case kCOUNT: return desc.type == DataType::kINT32; // kBOOL/kUINT8 are not plugin types; INT32 is
    default: return desc.type == inOut[kRESIDUAL].desc.type; // update and out
    }
}

int32_t TokenScatterPlugin::enqueue(nvinfer1::PluginTensorDesc const* inputDesc,
    nvinfer1::PluginTensorDesc const* /*outputDesc*/, void const* const* inputs, void* const* outputs,
    void* /*workspace*/, cudaStream_t stream) noexcept
{
    nvinfer1::Dims const& dims = inputDesc[kRESIDUAL].dims;
    int const dtype = toQtaleDtype(inputDesc[kRESIDUAL].type);
    if (dims.nbDims != 3 || inputDesc[kINDEX].dims.nbDims != 2 || dtype < 0)
    {
        logError("qtale: TokenScatter got unsupported tensors at enqueue");
        return -1;
    }
    // N comes from the (already resolved) index shape; rows i >= count[b] are skipped by the kernel.
    cudaError_t const status = qtale_token_scatter(inputs[kRESIDUAL], inputs[kUPDATE],
        static_cast<int32_t const*>(inputs[kINDEX]), static_cast<int32_t const*>(inputs[kCOUNT]), dims.d[0], dims.d[1],
        inputDesc[kINDEX].dims.d[1], dims.d[2], dtype, outputs[0], stream);
    if (status != cudaSuccess)
    {
        logError(cudaGetErrorString(status));
        return -1;
    }
    return 0;
}

} // namespace trt
} // namespace qtale

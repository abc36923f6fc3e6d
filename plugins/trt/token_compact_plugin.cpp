#include "token_compact_plugin.h"

namespace qtale {
namespace trt {

using nvinfer1::DataType;
using nvinfer1::DimensionOperation;

nvinfer1::IPluginV3* TokenCompactPlugin::clone() noexcept
{
    try
    {
        return new TokenCompactPlugin(*this);
    }
    catch (...)
    {
        logError("qtale: TokenCompact clone failed");
        return nullptr;
    }
}

int32_t TokenCompactPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    // Plugin I/O stays within what TensorRT 10 documents: PluginTensorDesc excludes kBOOL and kUINT8, and
    // getOutputDataTypes requires size-tensor outputs to be kINT32 (docs/tensorrt.md, plugin I/O table).
    if (nbInputs != 2 || nbOutputs != 4 || !isFloatType(inputTypes[0]) || inputTypes[1] != DataType::kINT32)
    {
        logError("qtale: TokenCompact needs hidden FP32/FP16/BF16 and gate INT32");
        return -1;
    }
    outputTypes[kCOMPACT] = inputTypes[0];
    outputTypes[kINDEX] = DataType::kINT32;
    outputTypes[kCOUNT] = DataType::kINT32;
    outputTypes[kN] = DataType::kINT32;
    return 0;
}

int32_t TokenCompactPlugin::getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
    nvinfer1::DimsExprs const* /*shapeInputs*/, int32_t /*nbShapeInputs*/, nvinfer1::DimsExprs* outputs,
    int32_t nbOutputs, nvinfer1::IExprBuilder& exprBuilder) noexcept
{
    if (nbInputs != 2 || nbOutputs != 4 || inputs[0].nbDims != 3 || inputs[1].nbDims != 2)
    {
        logError("qtale: TokenCompact needs hidden [B,T,H] and gate [B,T]");
        return -1;
    }
    nvinfer1::IDimensionExpr const* batch = inputs[0].d[0];
    nvinfer1::IDimensionExpr const* tokens = inputs[0].d[1];
    nvinfer1::IDimensionExpr const* width = inputs[0].d[2];
    // N = max(1, max_b count[b]) is only known after the kernel ran: a size tensor (output kN) with
    // upper bound T, which TensorRT uses to allocate compact/index. Auto-tuning uses ceil(T/2).
    nvinfer1::IDimensionExpr const* opt
        = exprBuilder.operation(DimensionOperation::kCEIL_DIV, *tokens, *exprBuilder.constant(2));
    if (opt == nullptr)
    {
        return -1;
    }
    nvinfer1::IDimensionExpr const* n = exprBuilder.declareSizeTensor(kN, *opt, *tokens);
    if (n == nullptr)
    {
        logError("qtale: TokenCompact could not declare its size tensor");
        return -1;
    }
    outputs[kCOMPACT].nbDims = 3;
    outputs[kCOMPACT].d[0] = batch;
    outputs[kCOMPACT].d[1] = n;
    outputs[kCOMPACT].d[2] = width;
    outputs[kINDEX].nbDims = 2;
    outputs[kINDEX].d[0] = batch;
    outputs[kINDEX].d[1] = n;
    outputs[kCOUNT].nbDims = 1;
    outputs[kCOUNT].d[0] = batch;
    outputs[kN].nbDims = 0; // size tensors must be 0-D
    return 0;
}

bool TokenCompactPlugin::supportsFormatCombination(
    int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (nbInputs != 2 || nbOutputs != 4 || pos < 0 || pos >= 6)
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
    case 0: return isFloatType(desc.type);                         // hidden
    case 2: return desc.type == inOut[0].desc.type;                // compact
    default: return desc.type == DataType::kINT32;                 // gate, index, count, n (size tensor)
    }
}

size_t TokenCompactPlugin::getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
    nvinfer1::DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept
{
    if (nbInputs != 2 || inputs[1].max.nbDims != 2)
    {
        return 0;
    }
    // The int32 partition scratch [B, T], sized for the profile's largest gate.
    return qtale_token_compact_workspace_size(inputs[1].max.d[0], inputs[1].max.d[1]);
}

int32_t TokenCompactPlugin::enqueue(nvinfer1::PluginTensorDesc const* inputDesc,
    nvinfer1::PluginTensorDesc const* /*outputDesc*/, void const* const* inputs, void* const* outputs, void* workspace,
    cudaStream_t stream) noexcept
{
    nvinfer1::Dims const& dims = inputDesc[0].dims;
    int const dtype = toQtaleDtype(inputDesc[0].type);
    if (dims.nbDims != 3 || dtype < 0)
    {
        logError("qtale: TokenCompact got an unsupported hidden tensor at enqueue");
        return -1;
    }
    cudaError_t const status = qtale_token_compact(inputs[0], static_cast<int32_t const*>(inputs[1]), dims.d[0],
        dims.d[1], dims.d[2], dtype, outputs[kCOMPACT], static_cast<int32_t*>(outputs[kINDEX]),
        static_cast<int32_t*>(outputs[kCOUNT]), static_cast<int32_t*>(outputs[kN]), workspace, stream);
    if (status != cudaSuccess)
    {
        logError(cudaGetErrorString(status));
        return -1;
    }
    return 0;
}

} // namespace trt
} // namespace qtale

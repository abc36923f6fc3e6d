#include "qtale_trt_common.h"

#include <atomic>

namespace qtale {
namespace trt {
namespace {
std::atomic<nvinfer1::ILoggerFinder*> gLoggerFinder{nullptr};
nvinfer1::PluginFieldCollection const gEmptyFields{0, nullptr};
} // namespace

void setLoggerFinder(nvinfer1::ILoggerFinder* finder) noexcept
{
    gLoggerFinder.store(finder);
}

void logError(char const* message) noexcept
{
    nvinfer1::ILoggerFinder* finder = gLoggerFinder.load();
    // Without a finder (library linked directly or loaded via --staticPlugins) fall back to TensorRT's global logger.
    nvinfer1::ILogger* logger = finder != nullptr ? finder->findLogger() : getLogger();
    if (logger != nullptr)
    {
        logger->log(nvinfer1::ILogger::Severity::kERROR, message);
    }
}

bool isFloatType(nvinfer1::DataType type) noexcept
{
    return toQtaleDtype(type) >= 0;
}

int toQtaleDtype(nvinfer1::DataType type) noexcept
{
    switch (type)
    {
    case nvinfer1::DataType::kFLOAT: return QTALE_FLOAT32;
    case nvinfer1::DataType::kHALF: return QTALE_FLOAT16;
    case nvinfer1::DataType::kBF16: return QTALE_BFLOAT16;
    default: return -1;
    }
}

nvinfer1::PluginFieldCollection const* emptyFields() noexcept
{
    return &gEmptyFields;
}

nvinfer1::IPluginCapability* PluginBase::getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
    case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
    case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

int32_t PluginBase::configurePlugin(nvinfer1::DynamicPluginTensorDesc const* /*in*/, int32_t nbInputs,
    nvinfer1::DynamicPluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    if (nbInputs != expectedInputs() || nbOutputs != getNbOutputs())
    {
        logError("qtale: unexpected number of plugin inputs/outputs");
        return -1;
    }
    return 0;
}

int32_t PluginBase::onShapeChange(nvinfer1::PluginTensorDesc const* /*in*/, int32_t nbInputs,
    nvinfer1::PluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    return nbInputs == expectedInputs() && nbOutputs == getNbOutputs() ? 0 : -1;
}

nvinfer1::IPluginV3* PluginBase::attachToContext(nvinfer1::IPluginResourceContext* /*context*/) noexcept
{
    // Stateless plugins: a plain clone is a valid per-context instance.
    return clone();
}

nvinfer1::PluginFieldCollection const* PluginBase::getFieldsToSerialize() noexcept
{
    return emptyFields();
}

} // namespace trt
} // namespace qtale

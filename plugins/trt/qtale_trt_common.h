// Shared pieces of the QTALE TensorRT 10 plugins (IPluginV3 with the V3One capabilities).
#pragma once

#include "qtale_kernels.h"

#include <NvInferRuntime.h>

#include <cstdint>

#if defined(_WIN32)
#define QTALE_TRT_API __declspec(dllexport)
#else
#define QTALE_TRT_API __attribute__((visibility("default")))
#endif

namespace qtale {
namespace trt {

// Must match the ONNX node attributes plugin_version / plugin_namespace written by the exporter.
constexpr char const* kPluginVersion = "1";
constexpr char const* kPluginNamespace = "qtale";

//! Route messages to the logger TensorRT hands us through setLoggerFinder (TensorRT's global getLogger() before that).
void setLoggerFinder(nvinfer1::ILoggerFinder* finder) noexcept;
void logError(char const* message) noexcept;

//! FP32 / FP16 / BF16: the float types the kernels accept.
bool isFloatType(nvinfer1::DataType type) noexcept;
//! qtale_dtype for a TensorRT float type, or -1.
int toQtaleDtype(nvinfer1::DataType type) noexcept;

//! Neither op has attributes of its own (plugin_version/plugin_namespace are consumed by the ONNX parser),
//! so creators advertise and plugins serialize an empty field collection.
nvinfer1::PluginFieldCollection const* emptyFields() noexcept;

//! Implements the parts both plugins share: capability lookup, identity strings, no-op configuration,
//! per-context cloning and (empty) serialization. Subclasses provide the op-specific build/runtime methods.
class PluginBase : public nvinfer1::IPluginV3,
                   public nvinfer1::IPluginV3OneCore,
                   public nvinfer1::IPluginV3OneBuild,
                   public nvinfer1::IPluginV3OneRuntime
{
public:
    ~PluginBase() override = default;

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;

    // IPluginV3OneCore (getPluginName is op-specific)
    char const* getPluginVersion() const noexcept override { return kPluginVersion; }
    char const* getPluginNamespace() const noexcept override { return kPluginNamespace; }

    // IPluginV3OneBuild: nothing to precompute; the kernels read shapes at enqueue time.
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::PluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

protected:
    PluginBase() = default;
    PluginBase(PluginBase const&) = default;
    //! Expected input/output counts, checked in configurePlugin/onShapeChange.
    virtual int32_t expectedInputs() const noexcept = 0;
};

//! Creator for a plugin class P that has a default constructor and a static kName.
template <typename P>
class PluginCreator : public nvinfer1::IPluginCreatorV3One
{
public:
    nvinfer1::IPluginV3* createPlugin(
        char const* /*name*/, nvinfer1::PluginFieldCollection const* /*fc*/, nvinfer1::TensorRTPhase /*phase*/) noexcept override
    {
        try
        {
            return new P();
        }
        catch (...)
        {
            logError("qtale: plugin allocation failed");
            return nullptr;
        }
    }
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override { return emptyFields(); }
    char const* getPluginName() const noexcept override { return P::kName; }
    char const* getPluginVersion() const noexcept override { return kPluginVersion; }
    char const* getPluginNamespace() const noexcept override { return kPluginNamespace; }
};

} // namespace trt
} // namespace qtale

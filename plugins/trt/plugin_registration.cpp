// Library entry points.
//
// * getCreators / setLoggerFinder: what IPluginRegistry::loadLibrary (trtexec --dynamicPlugins,
//   builder.get_plugin_registry().load_library in Python) looks up.
// * initQtalePlugins(): explicit registration into the global registry for applications that link
//   the library. libqtale_trt_plugins_static.so (QTALE_TRT_STATIC_REGISTRATION) calls it from a static
//   initializer so that merely dlopen-ing it registers the creators (trtexec --staticPlugins).
//   The dynamic variant does not, so loadLibrary never sees the same creator twice.
#include "token_compact_plugin.h"
#include "token_scatter_plugin.h"

namespace {

qtale::trt::PluginCreator<qtale::trt::TokenCompactPlugin> gTokenCompactCreator;
qtale::trt::PluginCreator<qtale::trt::TokenScatterPlugin> gTokenScatterCreator;
nvinfer1::IPluginCreatorInterface* const gCreators[] = {&gTokenCompactCreator, &gTokenScatterCreator};

} // namespace

extern "C" {

QTALE_TRT_API nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    nbCreators = static_cast<int32_t>(sizeof(gCreators) / sizeof(gCreators[0]));
    return gCreators;
}

QTALE_TRT_API void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
{
    qtale::trt::setLoggerFinder(finder);
}

QTALE_TRT_API bool initQtalePlugins()
{
    nvinfer1::IPluginRegistry* registry = getPluginRegistry();
    if (registry == nullptr)
    {
        return false;
    }
    bool ok = true;
    for (nvinfer1::IPluginCreatorInterface* creator : gCreators)
    {
        // Registered under the creators' own namespace so lookups by ("TokenCompact", "1", "qtale") match.
        ok = registry->registerCreator(*creator, qtale::trt::kPluginNamespace) && ok;
    }
    return ok;
}

} // extern "C"

#if defined(QTALE_TRT_STATIC_REGISTRATION)
namespace {
struct StaticRegistration
{
    StaticRegistration() { initQtalePlugins(); }
};
StaticRegistration const gStaticRegistration;
} // namespace
#endif

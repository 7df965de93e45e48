#include <bulkhead/dataplane.hpp>

#include <bpf/libbpf.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include <cstdarg>
#include <cstdio>
#include <string>

namespace bulkhead {
namespace {

// libbpf talks a lot while loading; its lines are debug output of ours.
int libbpf_to_spdlog(enum libbpf_print_level level, const char* format, va_list args)
{
    char line[1024];
    int n = std::vsnprintf(line, sizeof(line), format, args);
    std::string text(
        line, n > 0 ? std::min<std::size_t>(static_cast<std::size_t>(n), sizeof(line) - 1) : 0);

    while (!text.empty() && text.back() == '\n')
        text.pop_back();
    if (level == LIBBPF_DEBUG)
        spdlog::trace("libbpf: {}", text);
    else
        spdlog::debug("libbpf: {}", text);
    return n;
}

struct LogSetup {
    LogSetup()
    {
        libbpf_set_print(libbpf_to_spdlog);
        // diagnostics go to stderr; stdout is for results
        spdlog::set_default_logger(spdlog::stderr_color_mt("bulkhead"));
        spdlog::set_pattern("bulkhead: %l: %v");
        spdlog::set_level(spdlog::level::warn);
    }
};
const LogSetup log_setup;

}  // namespace

void set_verbose(bool verbose)
{
    spdlog::set_level(verbose ? spdlog::level::trace : spdlog::level::warn);
}

}  // namespace bulkhead

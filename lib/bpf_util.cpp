#include "bpf_util.hpp"

#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <fmt/format.h>

#include <cerrno>
#include <cstring>
#include <unistd.h>
#include <vector>

namespace bulkhead::detail {

Fd& Fd::operator=(Fd&& other) noexcept
{
    if (this != &other) {
        if (fd_ >= 0)
            ::close(fd_);
        fd_ = std::exchange(other.fd_, -1);
    }
    return *this;
}

Fd::~Fd()
{
    if (fd_ >= 0)
        ::close(fd_);
}

std::string errno_text(int error_number)
{
    return fmt::format("{} (errno {})", std::strerror(error_number), error_number);
}

void throw_errno(const std::string& action, int error_number, const std::string& hint)
{
    std::string message = fmt::format("cannot {}: {}", action, errno_text(error_number));
    if (error_number == EPERM || error_number == EACCES)
        message += "; run as root (CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN are needed)";
    else if (!hint.empty())
        message += "; " + hint;
    throw Error(message, error_number);
}

MapInfo map_info(int map_fd, const std::string& name)
{
    bpf_map_info info{};
    __u32 len = sizeof(info);

    if (bpf_obj_get_info_by_fd(map_fd, &info, &len) != 0)
        throw_errno(fmt::format("read the info of map '{}'", name), errno);
    return MapInfo{info.id,         info.type,        info.key_size,
                   info.value_size, info.max_entries, info.map_flags};
}

Fd map_create(std::uint32_t type, const std::string& name, std::uint32_t key_size,
              std::uint32_t value_size, std::uint32_t max_entries, std::uint32_t flags)
{
    LIBBPF_OPTS(bpf_map_create_opts, opts, .map_flags = flags);
    int fd = bpf_map_create(static_cast<bpf_map_type>(type), name.c_str(), key_size, value_size,
                            max_entries, &opts);

    if (fd < 0)
        throw_errno(fmt::format("create map '{}' with {} entries", name, max_entries), errno,
                    "a smaller table size may fit the memory limit");
    return Fd(fd);
}

Fd inner_map(int outer_fd, std::uint32_t slot, const std::string& outer_name)
{
    std::uint32_t id = 0;

    if (bpf_map_lookup_elem(outer_fd, &slot, &id) != 0) {
        if (errno == ENOENT)
            return Fd();
        throw_errno(fmt::format("read slot {} of map '{}'", slot, outer_name), errno);
    }
    int fd = bpf_map_get_fd_by_id(id);
    if (fd < 0)
        throw_errno(fmt::format("open the inner map {} of '{}'", id, outer_name), errno);
    return Fd(fd);
}

void map_update(int fd, const void* key, const void* value, const std::string& name)
{
    if (bpf_map_update_elem(fd, key, value, BPF_ANY) != 0)
        throw_errno(fmt::format("write an entry of map '{}'", name), errno);
}

bool map_lookup(int fd, const void* key, void* value)
{
    return bpf_map_lookup_elem(fd, key, value) == 0;
}

void map_delete(int fd, const void* key, const std::string& name)
{
    if (bpf_map_delete_elem(fd, key) != 0 && errno != ENOENT)
        throw_errno(fmt::format("delete an entry of map '{}'", name), errno);
}

std::size_t map_clear(int fd, std::uint32_t key_size, const std::string& name)
{
    std::vector<std::uint8_t> key(key_size);
    std::size_t deleted = 0;

    // always restart from the first key: deleting invalidates the cursor
    while (bpf_map_get_next_key(fd, nullptr, key.data()) == 0) {
        map_delete(fd, key.data(), name);
        ++deleted;
    }
    return deleted;
}

int possible_cpus()
{
    int n = libbpf_num_possible_cpus();

    if (n <= 0)
        throw_errno("count the possible CPUs", n < 0 ? -n : EINVAL);
    return n;
}

}  // namespace bulkhead::detail

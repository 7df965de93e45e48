// Owners and thin wrappers over the bpf() calls the library makes, so every
// failure becomes one bulkhead::Error that names the action, the object and
// the cause.
#pragma once

#include <bulkhead/types.hpp>

#include <cstdint>
#include <string>
#include <utility>

namespace bulkhead::detail {

// Owns one file descriptor.
class Fd {
public:
    Fd() = default;
    explicit Fd(int fd) noexcept : fd_(fd) {}
    Fd(Fd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
    Fd& operator=(Fd&& other) noexcept;
    Fd(const Fd&) = delete;
    Fd& operator=(const Fd&) = delete;
    ~Fd();

    int get() const noexcept { return fd_; }
    explicit operator bool() const noexcept { return fd_ >= 0; }

private:
    int fd_ = -1;
};

// "No such file or directory (errno 2)"
std::string errno_text(int error_number);

// Throws Error("cannot <action>: <errno text><hint>").
[[noreturn]] void throw_errno(const std::string& action, int error_number,
                              const std::string& hint = "");

struct MapInfo {
    std::uint32_t id = 0;
    std::uint32_t type = 0;
    std::uint32_t key_size = 0;
    std::uint32_t value_size = 0;
    std::uint32_t max_entries = 0;
    std::uint32_t flags = 0;
};

MapInfo map_info(int map_fd, const std::string& name);

// Creates a map the BPF object does not own (the inner maps of a generation).
Fd map_create(std::uint32_t type, const std::string& name, std::uint32_t key_size,
              std::uint32_t value_size, std::uint32_t max_entries, std::uint32_t flags);

// The fd of the inner map in `slot` of an outer map; an invalid Fd if the
// slot is empty.
Fd inner_map(int outer_fd, std::uint32_t slot, const std::string& outer_name);

void map_update(int fd, const void* key, const void* value, const std::string& name);
bool map_lookup(int fd, const void* key, void* value);
void map_delete(int fd, const void* key, const std::string& name);

// Deletes every entry; returns how many there were.
std::size_t map_clear(int fd, std::uint32_t key_size, const std::string& name);

// Number of CPUs a per-CPU map has values for: the possible CPUs, not the
// online ones.
int possible_cpus();

}  // namespace bulkhead::detail

// Attachments: XDP and cgroup programs as pinned BPF links.
#include "dataplane_impl.hpp"

#include <linux/if_link.h>
#include <linux/magic.h>
#include <net/if.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <unistd.h>

#include <fstream>
#include <map>
#include <sstream>

namespace bulkhead {

using detail::Fd;
using detail::throw_errno;
using namespace detail;
using nlohmann::json;
namespace fs = std::filesystem;

namespace {

std::uint64_t netns_inode()
{
    struct stat st {};
    // thread-self: the caller may have switched only its own thread
    if (::stat("/proc/thread-self/ns/net", &st) != 0)
        throw_errno("identify the current network namespace", errno);
    return st.st_ino;
}

// Pin names: the BPF filesystem refuses '.' in a name, and '/' cannot be in
// one, while interface names and cgroup paths hold both. They are escaped as
// %2e, %2f and %25 ('%' itself); ':' separates fields.
std::string escape_pin(std::string_view text)
{
    std::string out;
    for (char c : text)
        out += c == '.' ? "%2e" : c == '/' ? "%2f" : c == '%' ? "%25" : std::string(1, c);
    return out;
}

std::string unescape_pin(std::string_view text)
{
    std::string out;
    for (std::size_t i = 0; i < text.size(); ++i) {
        std::string_view code = text.substr(i, 3);
        char c = code == "%2e" ? '.' : code == "%2f" ? '/' : code == "%25" ? '%' : '\0';
        if (c != '\0') {
            out += c;
            i += 2;
        } else {
            out += text[i];
        }
    }
    return out;
}

// "a:b:c:rest" split at the first three colons; nullopt if fewer.
std::optional<std::array<std::string, 4>> split_pin(const std::string& name)
{
    auto a = name.find(':');
    auto b = a == std::string::npos ? a : name.find(':', a + 1);
    auto c = b == std::string::npos ? b : name.find(':', b + 1);
    if (c == std::string::npos)
        return std::nullopt;
    return std::array<std::string, 4>{name.substr(0, a), name.substr(a + 1, b - a - 1),
                                      name.substr(b + 1, c - b - 1), name.substr(c + 1)};
}

std::optional<std::uint64_t> parse_u64(const std::string& text)
{
    try {
        std::size_t used = 0;
        std::uint64_t v = std::stoull(text, &used);
        return used == text.size() ? std::optional(v) : std::nullopt;
    } catch (const std::exception&) {
        return std::nullopt;
    }
}

// A pinned XDP link: xdp:<mode>:<netns inode>:<interface>. Interface names
// are per network namespace, so the namespace is part of the name.
struct XdpPin {
    std::string mode;
    std::uint64_t netns = 0;
    std::string interface;

    std::string file_name() const
    {
        return fmt::format("xdp:{}:{}:{}", mode, netns, escape_pin(interface));
    }

    static std::optional<XdpPin> parse(const std::string& name)
    {
        auto parts = split_pin(name);
        if (!parts || (*parts)[0] != "xdp")
            return std::nullopt;
        auto netns = parse_u64((*parts)[2]);
        if (!netns)
            return std::nullopt;
        return XdpPin{(*parts)[1], *netns, unescape_pin((*parts)[3])};
    }
};

// A pinned cgroup link: cg:<hook>:<cgroup id>:<path>.
struct CgroupPin {
    std::string hook;
    std::uint64_t cgroup_id = 0;
    std::string path;

    std::string file_name() const
    {
        return fmt::format("cg:{}:{}:{}", hook, cgroup_id, escape_pin(path));
    }

    static std::optional<CgroupPin> parse(const std::string& name)
    {
        auto parts = split_pin(name);
        if (!parts || (*parts)[0] != "cg")
            return std::nullopt;
        auto id = parse_u64((*parts)[2]);
        if (!id)
            return std::nullopt;
        return CgroupPin{(*parts)[1], *id, unescape_pin((*parts)[3])};
    }
};

struct CgroupHook {
    const char* program;
    bpf_attach_type type;
    const char* name;
};

const std::array<CgroupHook, 6> kCgroupHooks{{
    {"bh_cg_ingress", BPF_CGROUP_INET_INGRESS, "ingress"},
    {"bh_cg_egress", BPF_CGROUP_INET_EGRESS, "egress"},
    {"bh_connect4", BPF_CGROUP_INET4_CONNECT, "connect4"},
    {"bh_connect6", BPF_CGROUP_INET6_CONNECT, "connect6"},
    {"bh_sendmsg4", BPF_CGROUP_UDP4_SENDMSG, "sendmsg4"},
    {"bh_sendmsg6", BPF_CGROUP_UDP6_SENDMSG, "sendmsg6"},
}};

}  // namespace

Attachment Dataplane::attach_xdp(const std::string& interface, XdpMode mode)
{
    DirLock lock(impl_->options.pin_dir);
    unsigned ifindex = ::if_nametoindex(interface.c_str());
    if (ifindex == 0)
        throw Error(fmt::format("cannot attach XDP to '{}': no such interface in this network "
                                "namespace; check `ip link`",
                                interface),
                    ENODEV);

    int prog_fd = bpf_program__fd(impl_->programs()->progs.bh_xdp);
    fs::path links = impl_->options.pin_dir / "links";
    std::uint64_t ns = netns_inode();

    // already ours: swap the program inside the link, no gap in enforcement
    for (const auto& entry : fs::directory_iterator(links)) {
        auto pin = XdpPin::parse(entry.path().filename());
        if (!pin || pin->netns != ns || pin->interface != interface)
            continue;
        Fd link(bpf_obj_get(entry.path().c_str()));
        bpf_link_info info{};
        __u32 len = sizeof(info);
        if (link && bpf_obj_get_info_by_fd(link.get(), &info, &len) == 0 &&
            info.xdp.ifindex == ifindex &&
            (mode == XdpMode::automatic || to_string(mode) == pin->mode)) {
            if (bpf_link_update(link.get(), prog_fd, nullptr) != 0)
                throw_errno(fmt::format("update the XDP program on '{}'", interface), errno);
            bpf_obj_get_info_by_fd(link.get(), &info, &len);  // the new program's id
            return Attachment{"xdp", interface, pin->mode, ifindex, info.prog_id, info.id, false};
        }
        if (link && info.xdp.ifindex == ifindex)
            bpf_link_detach(link.get());  // re-attach in the mode asked for
        fs::remove(entry.path());
    }

    std::vector<XdpMode> tries{mode};
    if (mode == XdpMode::automatic)
        tries = {XdpMode::native, XdpMode::generic};

    int err = 0;
    for (XdpMode m : tries) {
        LIBBPF_OPTS(bpf_link_create_opts, opts,
                    .flags = m == XdpMode::native ? XDP_FLAGS_DRV_MODE : XDP_FLAGS_SKB_MODE);
        Fd link(bpf_link_create(prog_fd, static_cast<int>(ifindex), BPF_XDP, &opts));
        if (!link) {
            err = errno;
            spdlog::debug("XDP {} mode on '{}' refused: {}", to_string(m), interface,
                          detail::errno_text(err));
            if (err == EBUSY || err == EEXIST)
                break;
            continue;
        }
        XdpPin pin{std::string(to_string(m)), ns, interface};
        fs::path path = links / pin.file_name();
        if (bpf_obj_pin(link.get(), path.c_str()) != 0)
            throw_errno(fmt::format("pin the XDP link of '{}' at '{}'", interface, path.string()),
                        errno);
        bpf_link_info info{};
        __u32 len = sizeof(info);
        bpf_obj_get_info_by_fd(link.get(), &info, &len);
        return Attachment{"xdp", interface, pin.mode, ifindex, info.prog_id, info.id, false};
    }

    if (err == EBUSY || err == EEXIST) {
        __u32 other = 0;
        bpf_xdp_query_id(static_cast<int>(ifindex), 0, &other);
        throw Error(fmt::format("cannot attach XDP to '{}': it already has an XDP program "
                                "(id {}) that bulkhead did not attach; remove it first, e.g. "
                                "`ip link set dev {} xdp off`",
                                interface, other, interface),
                    err);
    }
    throw_errno(fmt::format("attach XDP to '{}' in {} mode", interface, to_string(mode)), err,
                mode == XdpMode::native ? "the driver may lack native XDP; try --mode generic"
                                        : "run with -v for details");
}

void Dataplane::detach_xdp(const std::string& interface)
{
    DirLock lock(impl_->options.pin_dir);
    std::uint64_t ns = netns_inode();

    for (const auto& entry : fs::directory_iterator(impl_->options.pin_dir / "links")) {
        auto pin = XdpPin::parse(entry.path().filename());
        if (!pin || pin->netns != ns || pin->interface != interface)
            continue;
        Fd link(bpf_obj_get(entry.path().c_str()));
        if (link)
            bpf_link_detach(link.get());
        fs::remove(entry.path());
        return;
    }
    throw Error(fmt::format("cannot detach XDP from '{}': bulkhead has no XDP link on it in "
                            "this network namespace; see `bulkhead status`",
                            interface),
                ENOENT);
}

fs::path cgroup_v2_root()
{
    std::ifstream mounts("/proc/self/mountinfo");
    std::string line;
    std::optional<fs::path> found;
    while (std::getline(mounts, line)) {
        // "id parent major:minor root mount-point options ... - fstype source options"
        auto dash = line.find(" - ");
        if (dash == std::string::npos || line.compare(dash + 3, 8, "cgroup2 ") != 0)
            continue;
        std::istringstream fields(line.substr(0, dash));
        std::string id, parent, dev, root, mount_point;
        fields >> id >> parent >> dev >> root >> mount_point;
        if (!found || mount_point == "/sys/fs/cgroup")
            found = mount_point;
    }
    if (!found)
        throw Error(
            "cannot find a cgroup v2 mount in /proc/self/mountinfo; mount one with "
            "`mount -t cgroup2 none /sys/fs/cgroup/unified`",
            ENOENT);
    return *found;
}

fs::path resolve_cgroup_path(const fs::path& path)
{
    const fs::path root = cgroup_v2_root();
    const fs::path normal = path.lexically_normal();
    auto under = [](const fs::path& p, const fs::path& base) {
        auto rel = p.lexically_relative(base);
        return !rel.empty() && *rel.begin() != "..";
    };
    if (normal == root || under(normal, root))
        return normal;
    if (under(normal, "/sys/fs/cgroup"))  // written for a unified host, read on a hybrid one
        return root / normal.lexically_relative("/sys/fs/cgroup");
    return root / normal.relative_path();
}

Attachment Dataplane::attach_cgroup(const fs::path& path)
{
    DirLock lock(impl_->options.pin_dir);
    const fs::path resolved = resolve_cgroup_path(path);
    Fd cgroup(::open(resolved.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    struct statfs fs_info {};
    struct stat st {};

    if (!cgroup)
        throw_errno(fmt::format("attach to cgroup '{}'", resolved.string()), errno,
                    fmt::format("cgroup v2 is mounted at {}; create the cgroup first",
                                cgroup_v2_root().string()));
    if (::fstatfs(cgroup.get(), &fs_info) != 0 || fs_info.f_type != CGROUP2_SUPER_MAGIC ||
        ::fstat(cgroup.get(), &st) != 0)
        throw Error(fmt::format("cannot attach to '{}': not a cgroup v2 directory (cgroup v2 is "
                                "mounted at {})",
                                resolved.string(), cgroup_v2_root().string()),
                    EINVAL);

    const fs::path links = impl_->options.pin_dir / "links";
    std::vector<fs::path> created;
    bpf_link_info first{};  // of the first hook's link, for the caller
    try {
        for (const CgroupHook& hook : kCgroupHooks) {
            int prog_fd = program_fd(hook.program);
            fs::path pin = links / CgroupPin{hook.name, st.st_ino, resolved.string()}.file_name();
            Fd existing(bpf_obj_get(pin.c_str()));
            __u32 len = sizeof(first);
            // already ours: swap the program inside the link, one program per hook
            if (existing && bpf_link_update(existing.get(), prog_fd, nullptr) == 0) {
                if (!first.id)
                    bpf_obj_get_info_by_fd(existing.get(), &first, &len);
                continue;
            }
            fs::remove(pin);
            Fd link(bpf_link_create(prog_fd, cgroup.get(), hook.type, nullptr));
            if (!link)
                throw_errno(fmt::format("attach the {} program to cgroup '{}'", hook.name,
                                        resolved.string()),
                            errno);
            if (bpf_obj_pin(link.get(), pin.c_str()) != 0)
                throw_errno(fmt::format("pin the {} link at '{}'", hook.name, pin.string()), errno);
            created.push_back(pin);
            if (!first.id)
                bpf_obj_get_info_by_fd(link.get(), &first, &len);
        }
    } catch (...) {
        // all hooks or none: a half-attached cgroup would police one way only
        for (const fs::path& pin : created) {
            Fd link(bpf_obj_get(pin.c_str()));
            if (link)
                bpf_link_detach(link.get());
            fs::remove(pin);
        }
        throw;
    }
    return Attachment{"cgroup", resolved.string(),
                      "ingress,egress,connect4,connect6,sendmsg4,sendmsg6", 0, first.prog_id,
                      first.id, false};
}

void Dataplane::detach_cgroup(const fs::path& path)
{
    DirLock lock(impl_->options.pin_dir);
    const std::string resolved = resolve_cgroup_path(path).string();
    std::size_t removed = 0;

    for (const auto& entry : fs::directory_iterator(impl_->options.pin_dir / "links")) {
        auto pin = CgroupPin::parse(entry.path().filename());
        if (!pin || pin->path != resolved)
            continue;
        Fd link(bpf_obj_get(entry.path().c_str()));
        if (link)
            bpf_link_detach(link.get());
        fs::remove(entry.path());
        ++removed;
    }
    if (removed == 0)
        throw Error(fmt::format("cannot detach from cgroup '{}': bulkhead has no links there; "
                                "see `bulkhead status`",
                                resolved),
                    ENOENT);
}

namespace {

std::size_t detach_links(const fs::path& links)
{
    std::size_t n = 0;
    if (!fs::exists(links))
        return 0;
    for (const auto& entry : fs::directory_iterator(links)) {
        Fd link(bpf_obj_get(entry.path().c_str()));
        if (link)
            bpf_link_detach(link.get());
        fs::remove(entry.path());
        ++n;
    }
    return n;
}

}  // namespace

std::size_t Dataplane::detach_all()
{
    DirLock lock(impl_->options.pin_dir);
    return detach_links(impl_->options.pin_dir / "links");
}

void Dataplane::destroy(const fs::path& pin_dir)
{
    if (!fs::exists(pin_dir))
        return;
    {
        DirLock lock(pin_dir);
        detach_links(pin_dir / "links");
    }
    std::error_code ec;
    fs::remove_all(pin_dir, ec);
    if (ec)
        throw Error(
            fmt::format("cannot remove pin directory '{}': {}", pin_dir.string(), ec.message()),
            ec.value());
}

std::vector<Attachment> Dataplane::Impl::attachments() const
{
    std::vector<Attachment> out;
    std::map<std::string, Attachment> cgroups;  // one entry per cgroup, hooks listed

    for (const auto& entry : fs::directory_iterator(options.pin_dir / "links")) {
        const std::string name = entry.path().filename();
        Fd link(bpf_obj_get(entry.path().c_str()));
        bpf_link_info info{};
        __u32 len = sizeof(info);
        bool live = link && bpf_obj_get_info_by_fd(link.get(), &info, &len) == 0;

        if (auto pin = XdpPin::parse(name)) {
            Attachment a{"xdp", pin->interface, pin->mode, 0, 0, 0, true};
            if (live) {
                a.ifindex = info.xdp.ifindex;
                a.prog_id = info.prog_id;
                a.link_id = info.id;
                a.defunct = info.xdp.ifindex == 0;  // the interface went away
            }
            out.push_back(a);
        } else if (auto cg = CgroupPin::parse(name)) {
            auto [it, fresh] =
                cgroups.try_emplace(cg->path, Attachment{"cgroup", cg->path, "", 0, 0, 0, false});
            Attachment& a = it->second;
            a.mode += (fresh ? "" : ",") + cg->hook;
            a.prog_id = live ? info.prog_id : a.prog_id;
            a.link_id = live ? info.id : a.link_id;
            a.defunct = a.defunct || !live || info.cgroup.cgroup_id == 0;  // cgroup removed
        }
    }
    for (auto& [path, a] : cgroups)
        out.push_back(std::move(a));
    return out;
}

}  // namespace bulkhead

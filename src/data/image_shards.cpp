#include "omnilite/data/image_shards.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <memory>
#include <stdexcept>

#include <nlohmann/json.hpp>

#include "omnilite/data/image_dataset.h"
#include "omnilite/files.h"
#include "omnilite/log.h"

namespace omnilite {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr int64_t kBlock = 512;  // tar's record unit: a header, or a member's data padded to it

int64_t round_up(int64_t n) { return (n + kBlock - 1) / kBlock * kBlock; }

// A NUL-terminated (or full-width) field of a tar header.
std::string field(const char* p, size_t n) { return std::string(p, strnlen(p, n)); }

// A numeric header field: octal digits (ustar), or base-256 when the first byte has its high bit (GNU, for sizes
// of 8 GiB and more). -1 when it is neither.
int64_t number(const char* p, size_t n) {
  const auto* u = reinterpret_cast<const unsigned char*>(p);
  if (u[0] & 0x80) {
    int64_t v = u[0] & 0x7F;
    for (size_t i = 1; i < n; ++i) v = (v << 8) | u[i];
    return v;
  }
  int64_t v = 0;
  size_t i = 0;
  while (i < n && (p[i] == ' ' || p[i] == '\0')) ++i;
  bool any = false;
  for (; i < n && p[i] >= '0' && p[i] <= '7'; ++i) v = v * 8 + (p[i] - '0'), any = true;
  for (; i < n; ++i)
    if (p[i] != ' ' && p[i] != '\0') return -1;
  return any ? v : -1;
}

// The header's checksum: the sum of its bytes with the checksum field read as spaces.
int64_t header_sum(const char* h) {
  int64_t s = 0;
  for (int64_t i = 0; i < kBlock; ++i) s += (i >= 148 && i < 156) ? ' ' : static_cast<unsigned char>(h[i]);
  return s;
}

// Writes v as width - 1 zero-padded octal digits and a NUL (a ustar numeric field).
void octal(char* p, size_t width, uint64_t v) {
  p[width - 1] = '\0';
  for (size_t i = width - 1; i-- > 0; v >>= 3) p[i] = static_cast<char>('0' + (v & 7));
}

bool pread_all(int fd, void* buf, int64_t n, int64_t offset) {
  auto* p = static_cast<char*>(buf);
  while (n > 0) {
    const ssize_t r = ::pread(fd, p, static_cast<size_t>(n), offset);
    if (r <= 0) return false;
    p += r, n -= r, offset += r;
  }
  return true;
}

// The value of `key` in a pax extended header's records ("LEN key=value\n" ...), "" when absent.
std::string pax_value(const std::string& records, const std::string& key) {
  size_t i = 0;
  while (i < records.size()) {
    const size_t sp = records.find(' ', i);
    if (sp == std::string::npos) break;
    const size_t len = std::strtoull(records.c_str() + i, nullptr, 10);
    if (len == 0 || i + len > records.size()) break;
    const std::string rec = records.substr(sp + 1, i + len - sp - 2);  // without the trailing newline
    const size_t eq = rec.find('=');
    if (eq != std::string::npos && rec.substr(0, eq) == key) return rec.substr(eq + 1);
    i += len;
  }
  return "";
}

bool is_image_ext(const std::string& ext) {
  for (const char* e : {"png", "jpg", "jpeg", "ppm", "pgm", "pnm", "webp", "bmp"})
    if (ext == e) return true;
  return false;
}

// A sample being assembled from consecutive members of one key.
struct Pending {
  std::string key;
  int64_t image_offset = -1, image_bytes = 0, header_offset = 0;
  std::string image_member;
  std::string txt, json_text, cls;
  bool has_txt = false, has_json = false, has_cls = false;
};

std::string trim(const std::string& s) {
  const auto a = s.find_first_not_of(" \t\r\n");
  if (a == std::string::npos) return "";
  return s.substr(a, s.find_last_not_of(" \t\r\n") - a + 1);
}

std::vector<uint8_t> bytes_of(int fd, int64_t offset, int64_t n) {
  std::vector<uint8_t> b(static_cast<size_t>(n));
  if (n > 0 && !pread_all(fd, b.data(), n, offset)) return {};
  return b;
}

}  // namespace

bool is_image_shard_source(const std::string& entry) {
  std::error_code ec;
  if (fs::path(entry).extension() == ".tar") return true;
  if (!fs::is_directory(entry, ec)) return false;
  for (const auto& e : fs::directory_iterator(entry, ec))
    if (e.path().extension() == ".tar") return true;
  return false;
}

ImageShards::ImageShards(const std::vector<std::string>& entries, int64_t image_size, int64_t max_samples,
                         std::vector<std::vector<std::string>>& captions, std::vector<int64_t>& labels)
    : size_(image_size) {
  add_shards(entries, max_samples, captions, labels);
}

void ImageShards::add_shards(const std::vector<std::string>& entries, int64_t max_samples,
                             std::vector<std::vector<std::string>>& captions, std::vector<int64_t>& labels) {
  for (const auto& entry : entries) {
    std::vector<std::string> found;
    std::error_code ec;
    if (fs::is_directory(entry, ec)) {
      for (const auto& e : fs::directory_iterator(entry, ec))
        if (e.path().extension() == ".tar") found.push_back(e.path().string());
      std::sort(found.begin(), found.end());
      if (found.empty())
        throw std::runtime_error("image shards \"" + entry + "\": the folder holds no .tar shard; hint: write them "
                                 "with omnilite data webdataset");
    } else {
      found.push_back(entry);
    }
    for (const auto& path : found) {
      if (max_samples > 0 && size() >= max_samples) return;
      const int64_t before = size();
      index_shard(path, max_samples, captions, labels);
      fingerprint_ += (fingerprint_.empty() ? "" : ",") + fs::path(path).filename().string() + ":" +
                      std::to_string(size() - before);
    }
  }
}

ImageShards::~ImageShards() {
  for (int fd : fds_) ::close(fd);
}

void ImageShards::index_shard(const std::string& path, int64_t max_samples,
                              std::vector<std::vector<std::string>>& captions, std::vector<int64_t>& labels) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    throw std::runtime_error("image shard \"" + path + "\": cannot open (" + std::strerror(errno) + ")");
  const int64_t file_size = ::lseek(fd, 0, SEEK_END);
  const auto file = static_cast<int32_t>(files_.size());
  files_.push_back(path);
  fds_.push_back(fd);
  auto bad = [&](int64_t offset, const std::string& why) {
    ++skipped_;
    log::warn("image shard \"" + path + "\" byte " + std::to_string(offset) + ": " + why);
  };

  Pending cur;
  auto finish = [&]() {
    if (cur.key.empty()) return;
    std::vector<std::string> caps;
    int64_t label = -1;
    if (cur.has_json) {
      auto j = json::parse(cur.json_text, nullptr, false);
      if (!j.is_object()) {
        bad(cur.header_offset, "sample \"" + cur.key + "\": its .json is not a JSON object; the sample is skipped");
        cur = Pending{};
        return;
      }
      if (j.contains("captions") && j["captions"].is_array())
        for (const auto& c : j["captions"])
          if (c.is_string() && !c.get<std::string>().empty()) caps.push_back(c.get<std::string>());
      for (const char* k : {"caption", "text"})
        if (caps.empty() && j.contains(k) && j[k].is_string() && !j[k].get<std::string>().empty())
          caps.push_back(j[k].get<std::string>());
      if (j.contains("label") && j["label"].is_number_integer()) label = j["label"].get<int64_t>();
    }
    if (caps.empty() && cur.has_txt && !trim(cur.txt).empty()) caps.push_back(trim(cur.txt));
    if (cur.has_cls) {
      const std::string c = trim(cur.cls);
      char* end = nullptr;
      const long long v = std::strtoll(c.c_str(), &end, 10);
      if (c.empty() || *end != '\0') {
        bad(cur.header_offset, "sample \"" + cur.key + "\": its .cls \"" + c.substr(0, 20) +
                                   "\" is not an integer label; the sample is skipped");
        cur = Pending{};
        return;
      }
      label = v;
    }
    if (cur.image_offset < 0 || caps.empty()) {
      bad(cur.header_offset, "sample \"" + cur.key + "\" has " +
                                 (cur.image_offset < 0 ? "no image member (.png, .jpg, ...)" : "no caption (.txt or .json)") +
                                 "; the sample is skipped");
      cur = Pending{};
      return;
    }
    items_.push_back({file, cur.image_offset, cur.image_bytes, cur.image_member});
    captions.push_back(std::move(caps));
    labels.push_back(label);
    cur = Pending{};
  };

  int64_t off = 0;
  std::string long_name;  // from a GNU 'L' or pax 'x' header, for the next member
  char h[kBlock];
  while (off < file_size) {
    if (max_samples > 0 && size() >= max_samples) break;
    if (file_size - off < kBlock || !pread_all(fd, h, kBlock, off)) {
      bad(off, "truncated: " + std::to_string(file_size - off) + " bytes where a 512-byte header starts; the rest "
                   "of the shard is skipped");
      break;
    }
    if (std::all_of(h, h + kBlock, [](char c) { return c == '\0'; })) break;  // the end-of-archive blocks
    const int64_t sum = number(h + 148, 8);
    if (sum != header_sum(h)) {
      bad(off, "tar header checksum " + std::to_string(sum) + " does not match its bytes (" +
                   std::to_string(header_sum(h)) + "); the rest of the shard is skipped (hint: is it a tar file?)");
      break;
    }
    const int64_t bytes = number(h + 124, 12);
    const char type = h[156];
    std::string member = field(h, 100);
    const std::string prefix = field(h + 345, 155);
    // POSIX ustar ("ustar\0") has a path prefix there; GNU's own format ("ustar  ") keeps other fields there
    if (std::memcmp(h + 257, "ustar\0", 6) == 0 && !prefix.empty()) member = prefix + "/" + member;
    if (bytes < 0 || off + kBlock + bytes > file_size) {
      bad(off, "member \"" + member + "\" needs " + std::to_string(bytes) + " bytes, the shard ends after " +
                   std::to_string(std::max<int64_t>(0, file_size - off - kBlock)) +
                   " (truncated); the rest of the shard is skipped");
      break;
    }
    const int64_t data = off + kBlock;
    off = data + round_up(bytes);
    if (type == 'L' || type == 'x') {  // the next member's long path (GNU) or extended attributes (pax)
      const auto b = bytes_of(fd, data, bytes);
      const std::string s(b.begin(), b.end());
      long_name = type == 'L' ? field(s.c_str(), s.size()) : pax_value(s, "path");
      continue;
    }
    if (!long_name.empty()) member = long_name, long_name.clear();
    if (type != '0' && type != '\0' && type != '7') continue;  // directories, links, global pax headers
    const auto slash = member.rfind('/');
    const auto dot = member.find('.', slash == std::string::npos ? 0 : slash + 1);
    if (dot == std::string::npos) continue;  // no extension: not part of a sample
    const std::string key = member.substr(0, dot);
    std::string ext = member.substr(dot + 1);
    std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return std::tolower(c); });
    if (key != cur.key) {
      finish();
      cur.key = key;
      cur.header_offset = data - kBlock;
    }
    if (is_image_ext(ext) && cur.image_offset < 0) {
      cur.image_offset = data, cur.image_bytes = bytes, cur.image_member = member;
    } else if (ext == "txt" || ext == "json" || ext == "cls") {
      if (bytes > (1 << 20)) {
        bad(data - kBlock, "member \"" + member + "\" of " + std::to_string(bytes) + " bytes is too large for a "
                           "caption (1 MiB at most); ignored");
        continue;
      }
      const auto b = bytes_of(fd, data, bytes);
      std::string s(b.begin(), b.end());
      if (ext == "txt") cur.txt = std::move(s), cur.has_txt = true;
      else if (ext == "json") cur.json_text = std::move(s), cur.has_json = true;
      else cur.cls = std::move(s), cur.has_cls = true;
    }
  }
  if (max_samples == 0 || size() < max_samples) finish();
}

torch::Tensor ImageShards::decode(const Item& it) const {
  if (it.file < 0) return resize_image(decode_image_file(it.member), size_);
  const std::string name = "image shard \"" + files_[static_cast<size_t>(it.file)] + "\" byte " +
                           std::to_string(it.offset) + " (" + it.member + ")";
  std::vector<uint8_t> bytes(static_cast<size_t>(it.bytes));
  if (it.bytes > 0 && !pread_all(fds_[static_cast<size_t>(it.file)], bytes.data(), it.bytes, it.offset))
    throw std::runtime_error(name + ": cannot read " + std::to_string(it.bytes) + " bytes (" + std::strerror(errno) +
                             ")");
  return resize_image(decode_image_bytes(bytes, name), size_);
}

// [n] sample indices -> [n, size, size, 3] uint8
torch::Tensor ImageShards::gather(const std::vector<int64_t>& idx, int64_t* replaced) const {
  auto out = torch::empty({static_cast<int64_t>(idx.size()), size_, size_, 3}, torch::kUInt8);
  const int64_t n = size();
  for (size_t p = 0; p < idx.size(); ++p) {
    int64_t i = idx[p];
    for (int tries = 0;; ++tries) {
      try {
        out[static_cast<int64_t>(p)].copy_(decode(items_[static_cast<size_t>(i)]));
        break;
      } catch (const std::exception& e) {
        if (tries + 1 >= 64)
          throw std::runtime_error(std::string("image shards: 64 images in a row do not decode, the last: ") +
                                   e.what() + "; hint: check the shards (omnilite data webdataset writes them)");
        log::warn(std::string(e.what()) + "; replaced by the next sample");
        if (replaced) ++*replaced;
        i = (i + 1) % n;
      }
    }
  }
  return out;
}

std::vector<std::string> write_image_shards(const ImageCaptionSet& set, const ImageShardWriteOptions& o) {
  if (o.shard_samples <= 0 || o.repeat <= 0)
    throw std::runtime_error("data webdataset: --shard-samples and --repeat must be positive");
  fs::create_directories(o.out_dir);
  for (const auto& e : fs::directory_iterator(o.out_dir))
    if (e.path().extension() == ".tar")
      throw std::runtime_error("data webdataset: --out \"" + o.out_dir + "\" already holds shards (" +
                               e.path().filename().string() + "); hint: choose an empty folder");
  std::vector<std::string> paths;
  std::unique_ptr<AtomicFile> f;  // the shard being written
  auto close_shard = [&]() {
    if (!f) return;
    static const char zeros[2 * kBlock] = {};
    f->write(zeros, sizeof zeros);
    f->commit();
    f.reset();
  };
  // one member: a ustar header (name, mode 0644, size, checksum), the data, zero padding to 512 bytes
  auto member = [&](const std::string& name, const void* data, int64_t n) {
    char h[kBlock] = {};
    std::memcpy(h, name.data(), std::min<size_t>(name.size(), 99));
    octal(h + 100, 8, 0644);  // mode
    octal(h + 108, 8, 0);     // uid
    octal(h + 116, 8, 0);     // gid
    octal(h + 124, 12, static_cast<uint64_t>(n));
    octal(h + 136, 12, 0);    // mtime
    h[156] = '0';             // a regular file
    std::memcpy(h + 257, "ustar", 6);  // magic "ustar\0", version "00"
    std::memcpy(h + 263, "00", 2);
    octal(h + 148, 7, static_cast<uint64_t>(header_sum(h)));  // six digits, NUL, then a space (as GNU tar writes)
    h[155] = ' ';
    static const char pad[kBlock] = {};
    f->write(h, kBlock);
    f->write(data, static_cast<size_t>(n));
    f->write(pad, static_cast<size_t>(round_up(n) - n));
  };
  int64_t k = 0;
  for (int64_t r = 0; r < o.repeat; ++r) {
    for (int64_t i = 0; i < set.size(); ++i, ++k) {
      if (k % o.shard_samples == 0) {
        close_shard();
        const auto name = log::format("shard-%06lld.tar", static_cast<long long>(k / o.shard_samples));
        paths.push_back((fs::path(o.out_dir) / name).string());
        f = std::make_unique<AtomicFile>(paths.back());
      }
      const std::string key = log::format("%09lld", static_cast<long long>(k));
      const auto png = encode_png(set.gather(torch::tensor({i}, torch::kInt64))[0]);
      const auto& caps = set.captions[static_cast<size_t>(i)];
      const int64_t label = set.labels[i].item<int64_t>();
      json meta = {{"captions", caps}};
      if (label >= 0) meta["label"] = label;
      const std::string txt = caps.empty() ? "" : caps.front(), js = meta.dump();
      member(key + ".png", png.data(), static_cast<int64_t>(png.size()));
      member(key + ".txt", txt.data(), static_cast<int64_t>(txt.size()));
      member(key + ".json", js.data(), static_cast<int64_t>(js.size()));
      if (label >= 0) {
        const std::string cls = std::to_string(label);
        member(key + ".cls", cls.data(), static_cast<int64_t>(cls.size()));
      }
    }
  }
  close_shard();
  return paths;
}

}  // namespace omnilite

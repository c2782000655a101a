// Image-caption tar shards (data/image_shards.h): our shards against GNU tar (it lists and extracts them, and the
// header bytes are checked by hand from the ustar definition), shards made by GNU tar (GNU long names, pax headers,
// subfolders, every caption form) read as WebDataset groups them, bad data skipped and counted, and exact resume
// of a run that streams its images from shards with loader threads on.
#include "catch_compat.h"

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>

#include <unistd.h>

#include "helpers.h"
#include "omnilite/data/image_dataset.h"
#include "omnilite/data/image_shards.h"
#include "omnilite/data/mm_batch.h"
#include "omnilite/log.h"
#include "omnilite/train/trainer.h"

using namespace omnilite;
namespace fs = std::filesystem;

namespace {

using testing::bytes_of;
using testing::write_bytes;

// stdout of a shell command (throws when it fails). The folder is per process: ctest -j runs the test cases that
// call this side by side, and a shared folder was emptied under the other one's command.
std::string shell(const std::string& cmd) {
  static const std::string dir = testing::fresh_temp_dir("image_shards_shell_" + std::to_string(::getpid()));
  const std::string out = dir + "/out";
  if (std::system((cmd + " > " + out + " 2>&1").c_str()) != 0)
    throw std::runtime_error("command failed: " + cmd + ": " + bytes_of(out));
  return bytes_of(out);
}

// A distinct [28, 28, 3] uint8 picture per seed.
torch::Tensor picture(int64_t seed) {
  torch::manual_seed(seed);
  return torch::randint(0, 256, {28, 28, 3}, torch::kInt64).to(torch::kUInt8);
}

}  // namespace

TEST_CASE("data webdataset writes POSIX tar shards that GNU tar lists and extracts member for member",
          "[imageshards]") {
  if (!have_opencv()) return;
  const std::string dir = testing::fresh_temp_dir("image_shards_write");
  ImageLoadOptions io;
  io.size = 28;
  const auto set = read_image_captions({testing::write_synthetic_fashion(dir, "train", 5, 4, 1)}, io);
  REQUIRE(set.size() == 5);
  ImageShardWriteOptions o;
  o.out_dir = dir + "/shards";
  o.shard_samples = 2;
  const auto paths = write_image_shards(set, o);
  REQUIRE(paths.size() == 3);
  CHECK(fs::path(paths[0]).filename() == "shard-000000.tar");
  CHECK_FALSE(fs::exists(paths[0] + ".tmp"));
  // the first header, field by field (POSIX.1-1988 ustar: name, mode, uid, gid, size, mtime, chksum, typeflag, magic)
  const std::string t = bytes_of(paths[0]);
  REQUIRE(t.size() % 512 == 0);
  CHECK(t.substr(t.size() - 1024) == std::string(1024, '\0'));  // two zero blocks end the archive
  CHECK(std::string(t.c_str()) == "000000000.png");
  CHECK(t.substr(100, 8) == std::string("0000644\0", 8));
  CHECK(t[156] == '0');
  CHECK(t.substr(257, 8) == std::string("ustar\0" "00", 8));
  long sum = 0;
  for (int i = 0; i < 512; ++i) sum += (i >= 148 && i < 156) ? ' ' : static_cast<unsigned char>(t[i]);
  CHECK(std::strtol(t.substr(148, 7).c_str(), nullptr, 8) == sum);
  const long png_bytes = std::strtol(t.substr(124, 11).c_str(), nullptr, 8);
  CHECK(t.substr(512, 8) == "\x89PNG\r\n\x1a\n");
  // GNU tar's view: members in order, and their contents
  CHECK(shell("tar -tf " + paths[0]) ==
        "000000000.png\n000000000.txt\n000000000.json\n000000000.cls\n"
        "000000001.png\n000000001.txt\n000000001.json\n000000001.cls\n");
  const std::string x = dir + "/x";
  fs::create_directories(x);
  shell("tar -xf " + paths[1] + " -C " + x);
  CHECK(static_cast<long>(fs::file_size(x + "/000000002.png")) != 0);
  CHECK(bytes_of(x + "/000000002.txt") == set.captions[2][0]);
  CHECK(bytes_of(x + "/000000002.cls") == std::to_string(set.labels[2].item<int64_t>()));
  const auto meta = nlohmann::json::parse(bytes_of(x + "/000000002.json"));
  CHECK(meta["captions"].get<std::vector<std::string>>() == set.captions[2]);
  CHECK(meta["label"].get<int64_t>() == set.labels[2].item<int64_t>());
  CHECK(torch::equal(decode_image_file(x + "/000000002.png"), set.images[2]));
  shell("tar -xf " + paths[0] + " -C " + x);
  CHECK(static_cast<long>(fs::file_size(x + "/000000000.png")) == png_bytes);
  // an --out that already holds shards is refused
  REQUIRE_THROWS_WITH(write_image_shards(set, o), ContainsText("already holds shards"));
}

TEST_CASE("tar shards made by GNU tar read as WebDataset samples: long names, pax, subfolders, caption forms",
          "[imageshards]") {
  if (!have_opencv()) return;
  const std::string dir = testing::fresh_temp_dir("image_shards_read");
  const std::string src = dir + "/src";
  fs::create_directories(src + "/sub");
  const std::string longkey = std::string(120, 'k');
  write_image_file(picture(1), src + "/sub/000.png");
  write_bytes(src + "/sub/000.txt", "  a photo of a shoe.\n");
  write_image_file(picture(2), src + "/001.png");
  write_bytes(src + "/001.json", R"({"captions": ["first", "second"], "label": 3})");
  write_bytes(src + "/002.txt", "a caption without an image");  // skipped
  write_image_file(picture(3), src + "/003.png");
  write_bytes(src + "/003.cls", "seven");  // not an integer: skipped
  write_image_file(picture(4), src + "/" + longkey + ".png");
  write_bytes(src + "/" + longkey + ".cls", "2\n");
  write_bytes(src + "/" + longkey + ".json", R"({"caption": "long"})");
  fs::create_directories(dir + "/shards");
  shell("cd " + src + " && tar --format=gnu -cf " + dir + "/shards/a.tar sub/000.png sub/000.txt 001.png 001.json "
        "002.txt 003.png 003.cls");
  shell("cd " + src + " && tar --format=gnu -cf " + dir + "/shards/b.tar " + longkey + ".png " + longkey + ".cls " +
        longkey + ".json");
  shell("cd " + src + " && tar --format=pax -cf " + dir + "/shards/c.tar " + longkey + ".png " + longkey + ".cls " +
        longkey + ".json");
  REQUIRE(is_image_shard_source(dir + "/shards"));
  CHECK_FALSE(is_image_shard_source(src));
  std::vector<std::vector<std::string>> caps;
  std::vector<int64_t> labels;
  ImageShards s({dir + "/shards"}, 28, 0, caps, labels);
  CHECK(s.shards() == 3);
  REQUIRE(s.size() == 4);
  CHECK(s.skipped() == 2);
  CHECK(caps == std::vector<std::vector<std::string>>{{"a photo of a shoe."}, {"first", "second"}, {"long"}, {"long"}});
  CHECK(labels == std::vector<int64_t>{-1, 3, 2, 2});
  int64_t replaced = 0;
  const auto g = s.gather({3, 0, 1, 2}, &replaced);
  CHECK(replaced == 0);
  CHECK(g.sizes() == torch::IntArrayRef({4, 28, 28, 3}));
  CHECK(torch::equal(g[0], picture(4)));
  CHECK(torch::equal(g[1], picture(1)));
  CHECK(torch::equal(g[2], picture(2)));
  CHECK(torch::equal(g[3], picture(4)));
  // through read_image_captions, after an in-memory source, and resized on the way
  ImageLoadOptions io;
  io.size = 14;
  const auto set = read_image_captions({dir + "/shards/a.tar", testing::write_synthetic_fashion(dir, "t", 3, 2, 1)}, io);
  REQUIRE(set.size() == 5);
  CHECK(set.in_memory() == 3);
  CHECK(set.captions[3] == std::vector<std::string>{"a photo of a shoe."});
  CHECK(set.labels[4].item<int64_t>() == 3);
  const auto both = set.gather(torch::tensor({4, 0}, torch::kInt64));
  CHECK(torch::equal(both[0], resize_image(picture(2), 14)));
  CHECK(torch::equal(both[1], set.images[0]));
  io.max_images = 4;
  CHECK(read_image_captions({dir + "/shards/a.tar", dir + "/t"}, io).size() == 4);
}

TEST_CASE("a truncated tar, a bad header and an undecodable image are skipped or replaced, and counted",
          "[imageshards]") {
  if (!have_opencv()) return;
  const std::string dir = testing::fresh_temp_dir("image_shards_bad");
  ImageLoadOptions io;
  io.size = 28;
  const auto set = read_image_captions({testing::write_synthetic_fashion(dir, "train", 4, 4, 1)}, io);
  ImageShardWriteOptions o;
  o.out_dir = dir + "/good";
  const std::string good = bytes_of(write_image_shards(set, o).at(0));
  const size_t third = good.find("000000002.png");  // the third sample's first header
  REQUIRE(third != std::string::npos);
  std::vector<std::vector<std::string>> caps;
  std::vector<int64_t> labels;
  auto open = [&](const std::string& name, const std::string& bytes) {
    fs::create_directories(dir + "/" + name);
    write_bytes(dir + "/" + name + "/s.tar", bytes);
    caps.clear(), labels.clear();
    return std::make_unique<ImageShards>(std::vector<std::string>{dir + "/" + name}, 28, 0, caps, labels);
  };
  // cut inside the third sample's image: two samples, the cut one counted
  auto cut = open("cut", good.substr(0, third + 512 + 40));
  CHECK(cut->size() == 2);
  CHECK(cut->skipped() == 1);
  // a header byte changed: its checksum fails, the rest of the shard is skipped
  std::string header = good;
  header[third + 3] = 'X';
  auto bad_header = open("header", header);
  CHECK(bad_header->size() == 2);
  CHECK(bad_header->skipped() == 1);
  // the second image's PNG signature overwritten: replaced by the third when gathered, and counted
  std::string undecodable = good;
  const size_t second = good.find("000000001.png");
  undecodable.replace(second + 512, 8, "garbage!");
  auto bad_image = open("image", undecodable);
  REQUIRE(bad_image->size() == 4);
  int64_t replaced = 0;
  const auto g = bad_image->gather({1, 0}, &replaced);
  CHECK(replaced == 1);
  CHECK(torch::equal(g[0], set.images[2]));
  CHECK(torch::equal(g[1], set.images[0]));
  // a shard that cannot be opened, and a folder with none, are errors
  REQUIRE_THROWS_WITH(ImageShards({dir + "/missing.tar"}, 28, 0, caps, labels), ContainsText("missing.tar") &&
                                                                                    ContainsText("cannot open"));
  fs::create_directories(dir + "/empty");
  REQUIRE_THROWS_WITH(ImageShards({dir + "/empty"}, 28, 0, caps, labels), ContainsText("holds no .tar"));
}

TEST_CASE("a run streaming its images from tar shards with loader threads resumes exactly and counts bad images",
          "[imageshards][train]") {
  if (!have_opencv()) return;
  const std::string dir = testing::fresh_temp_dir("image_shards_resume");
  Config c = testing::tiny_multimodal_config(dir + "/data");
  ImageLoadOptions io;
  io.size = std::max(c.model.vision.image_size, c.model.vqvae.image_size);
  const auto set = read_image_captions(c.data.image_train, io);
  ImageShardWriteOptions o;
  o.out_dir = dir + "/shards";
  o.shard_samples = 20;
  const auto paths = write_image_shards(set, o);
  REQUIRE(paths.size() == 4);
  // every 8th image undecodable (its PNG signature overwritten)
  std::set<int64_t> broken;
  for (int64_t i = 0; i < set.size(); i += 8) {
    const std::string path = paths[static_cast<size_t>(i / 20)];
    std::string b = bytes_of(path);
    const size_t at = b.find(log::format("%09lld.png", static_cast<long long>(i)));
    REQUIRE(at != std::string::npos);
    b.replace(at + 512, 8, "garbage!");
    write_bytes(path, b);
    broken.insert(i);
  }
  // and a caption without an image appended to the last shard by GNU tar: skipped when indexed, counted
  write_bytes(dir + "/999999999.txt", "a caption whose image is missing");
  shell("tar -rf " + paths.back() + " -C " + dir + " 999999999.txt");
  c.data.image_train = {o.out_dir};
  c.train.gen_batch_size = 0;
  c.train.steps = 6;
  c.train.ckpt_every = 3;
  c.train.loader_threads = 2;
  const auto [ma, mb] = testing::straight_and_resumed(c, dir, 3);
  REQUIRE(ma.size() == 6);
  REQUIRE(mb.size() == 6);
  // the broken images drawn, from the sampler's own epoch order: items m * B + i of micro-batch m
  const EpochSampler order(set.size(), splitmix64(c.train.seed ^ 0xC0FFEEULL));
  for (size_t m = 0; m < 6; ++m) {
    INFO("step " << m + 1);
    int64_t drawn = 0;
    for (int64_t i = 0; i < c.train.caption_batch_size; ++i)
      drawn += broken.count(order.at(static_cast<int64_t>(m) * c.train.caption_batch_size + i));
    CHECK(mb[m]["loss"].get<double>() == ma[m]["loss"].get<double>());
    CHECK(ma[m]["data_bad_images"].get<double>() == drawn);
    CHECK(ma[m]["data_skipped_images"].get<double>() == 1);
  }
  std::ifstream sf(dir + "/a/checkpoints/step_0000006/state.json");
  CHECK(nlohmann::json::parse(sf)["data"]["data.image_train"].get<std::string>() ==
        "shard-000000.tar:20,shard-000001.tar:20,shard-000002.tar:20,shard-000003.tar:4");
}

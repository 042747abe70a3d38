// `gate image build --base <cloud image>` against a mirror on loopback (a real HTTP
// server, test/support/mirror_server.cc): progress, resume after a broken
// connection, refusal of an image whose checksum is wrong, and the cache.
#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

#include "core/process.h"
#include "support/test_support.h"

using namespace gate;
using test::read_file;
namespace fs = std::filesystem;

namespace {

constexpr const char* kDir = "releases/24.04/release/";
constexpr const char* kFile = "ubuntu-24.04-server-cloudimg-amd64.img";
constexpr std::size_t kImageBytes = 8u << 20;

// A mirror tree with an image of random bytes and its SHA256SUMS (by sha256sum, not
// by gate), served by a real HTTP server; a cache directory of its own.
struct Mirror {
  explicit Mirror(std::string drop_after = "") {
    fs::create_directories(root() + "/" + kDir);
    std::mt19937_64 rng(std::random_device{}());
    std::string data(kImageBytes, '\0');
    for (auto& c : data) c = static_cast<char>(rng());
    std::ofstream(image()) << data;
    RunResult sum = run_command({"sha256sum", image()});
    REQUIRE(sum.status == 0);
    checksum = sum.output.substr(0, 64);
    write_sums(checksum);
    std::vector<std::string> argv = {GATE_TEST_MIRROR, root(), dir.path() + "/port", log()};
    if (!drop_after.empty()) argv.insert(argv.end(), {std::string("/") + kDir + kFile, drop_after});
    server = test::Child::spawn(argv, dir.path() + "/server.out");
    REQUIRE(test::eventually([&] { return fs::exists(dir.path() + "/port"); }));
    port = std::stoi(read_file(dir.path() + "/port"));
  }
  // gpg leaves an agent running on its home directory, which may still write there
  // while the directory is removed: it is stopped first.
  ~Mirror() {
    if (fs::exists(dir.path() + "/gnupg"))
      run_command({"gpgconf", "--homedir", dir.path() + "/gnupg", "--kill", "all"}, std::chrono::seconds(20));
  }
  Mirror(const Mirror&) = delete;
  Mirror& operator=(const Mirror&) = delete;
  std::string root() const { return dir.path() + "/www"; }
  std::string image() const { return root() + "/" + kDir + kFile; }
  std::string log() const { return dir.path() + "/requests.log"; }
  std::string url() const { return "http://127.0.0.1:" + std::to_string(port) + "/"; }
  std::string cache() const { return dir.path() + "/cache"; }
  std::string cached() const { return cache() + "/gate/images/ubuntu-24.04/" + kFile; }
  void write_sums(const std::string& sum) const {
    std::ofstream(root() + "/" + kDir + "SHA256SUMS")
        << "0000000000000000000000000000000000000000000000000000000000000000 *other.img\n"
        << sum << " *" << kFile << "\n";
  }
  // How often the image itself was asked for.
  int image_gets() const {
    std::ifstream in(log());
    int n = 0;
    for (std::string line; std::getline(in, line);) n += line.find(kFile) != std::string::npos;
    return n;
  }
  RunResult fetch(const std::string& mirror) const {
    test::ScopedEnv xdg("XDG_CACHE_HOME", cache());
    test::ScopedEnv key("GATE_IMAGE_KEYRING", keyring);
    return run_command({test::gate_binary(), "image", "build", "--base", "ubuntu-24.04", "--image-mirror", mirror},
                       std::chrono::seconds(120));
  }
  // Signs the mirror's SHA256SUMS as the publisher does (a detached OpenPGP signature,
  // SHA256SUMS.gpg) with a key made here by gpg, and gives gate that key's keyring.
  void sign_sums() {
    const std::string home = dir.path() + "/gnupg";
    fs::create_directories(home);
    fs::permissions(home, fs::perms::owner_all);
    auto gpg = [&](std::vector<std::string> args) {
      args.insert(args.begin(), {"gpg", "--homedir", home, "--batch", "--pinentry-mode", "loopback",
                                 "--passphrase", ""});
      RunResult r = run_command(args, std::chrono::seconds(60));
      INFO(r.output);
      REQUIRE(r.status == 0);
      return r;
    };
    gpg({"--quick-gen-key", "gate test mirror <mirror@localhost>", "ed25519", "sign", "never"});
    keyring = dir.path() + "/mirror-keyring.gpg";
    gpg({"--output", keyring, "--export"});
    const std::string sums = root() + "/" + kDir + "SHA256SUMS";
    gpg({"--yes", "--output", sums + ".gpg", "--detach-sign", sums});
  }
  RunResult fetch() const { return fetch(url()); }

  test::TempDir dir{"gate-image-test"};
  std::string checksum;
  // GATE_IMAGE_KEYRING for gate: no signature checked unless a test says otherwise (a
  // host with ubuntu-keyring has Ubuntu's key); "": the default.
  std::string keyring = "none";
  int port = 0;
  test::Child server;
};

}  // namespace

TEST_CASE("a cloud image is downloaded from a mirror with progress, verified and cached", "[image]") {
  Mirror m;
  RunResult r = m.fetch();
  INFO(r.output);
  REQUIRE(r.status == 0);
  // Not a terminal: a plain line at each tenth (the first data past it), the last
  // one at the whole.
  int lines = 0;
  std::istringstream out(r.output);
  for (std::string line; std::getline(out, line);)
    lines += line.rfind(std::string(kFile) + ": ", 0) == 0 && line.find(" of 8.0 MiB (") != std::string::npos;
  CHECK(lines >= 9);  // (the first data past each tenth: one line each, give or take
  CHECK(lines <= 11);  // a read that spans two)
  CHECK(r.output.find(std::string(kFile) + ": 8.0 MiB of 8.0 MiB (100%)") != std::string::npos);
  CHECK(r.output.find(m.cached()) != std::string::npos);
  CHECK(read_file(m.cached()) == read_file(m.image()));
  CHECK(read_file(m.cached() + ".sha256") == m.checksum + "\n");
  CHECK(m.image_gets() == 1);

  SECTION("the next build uses the cache while the publisher's checksum names it") {
    RunResult again = m.fetch();
    INFO(again.output);
    REQUIRE(again.status == 0);
    CHECK(again.output.find("using the cached " + std::string(kFile)) != std::string::npos);
    CHECK(m.image_gets() == 1);
  }
  SECTION("with the publisher out of reach, the cached image serves, and says so") {
    RunResult offline = m.fetch("http://127.0.0.1:1/");
    INFO(offline.output);
    REQUIRE(offline.status == 0);
    CHECK(offline.output.find("cannot fetch") != std::string::npos);
    CHECK(offline.output.find("verified when it was downloaded") != std::string::npos);
  }
  SECTION("a cached image that no longer matches its checksum is fetched again") {
    std::fstream f(m.cached(), std::ios::in | std::ios::out | std::ios::binary);
    char first = 0;
    f.read(&first, 1);
    first = static_cast<char>(first ^ 0xff);  // surely another byte
    f.seekp(0);
    f.write(&first, 1);
    f.close();
    RunResult again = m.fetch();
    INFO(again.output);
    REQUIRE(again.status == 0);
    CHECK(again.output.find("no longer matches its checksum") != std::string::npos);
    CHECK(m.image_gets() == 2);
    CHECK(read_file(m.cached()) == read_file(m.image()));
  }
}

TEST_CASE("a download broken half way is resumed where it broke", "[image]") {
  Mirror m(std::to_string(kImageBytes / 2));
  RunResult r = m.fetch();
  INFO(r.output);
  REQUIRE(r.status == 0);
  CHECK(r.output.find("the download broke at 4.0 MiB") != std::string::npos);
  CHECK(r.output.find("resuming (attempt 2 of") != std::string::npos);
  CHECK(read_file(m.log()).find(std::string(kFile) + " from=" + std::to_string(kImageBytes / 2)) !=
        std::string::npos);
  CHECK(read_file(m.cached()) == read_file(m.image()));
  CHECK_FALSE(fs::exists(m.cached() + ".part"));
}

TEST_CASE("a partial download is resumed by the next build, unless it is of another image", "[image]") {
  Mirror m;
  fs::create_directories(fs::path(m.cached()).parent_path());
  const std::string first_mib = read_file(m.image()).substr(0, 1 << 20);
  SECTION("the same image: resumed where it stopped") {
    std::ofstream(m.cached() + ".part") << first_mib;
    std::ofstream(m.cached() + ".part.want") << m.checksum << "\n";
    RunResult r = m.fetch();
    INFO(r.output);
    REQUIRE(r.status == 0);
    CHECK(read_file(m.log()).find(std::string(kFile) + " from=1048576") != std::string::npos);
    CHECK(read_file(m.log()).find(std::string(kFile) + " from=0") == std::string::npos);
  }
  SECTION("another image (the publisher's file names stay): started over") {
    std::ofstream(m.cached() + ".part") << std::string(1 << 20, 'x');
    std::ofstream(m.cached() + ".part.want") << std::string(64, 'b') << "\n";
    RunResult r = m.fetch();
    INFO(r.output);
    REQUIRE(r.status == 0);
    CHECK(r.output.find("a partial download of another version") != std::string::npos);
    CHECK(read_file(m.log()).find(std::string(kFile) + " from=0") != std::string::npos);
  }
  CHECK(read_file(m.cached()) == read_file(m.image()));
  CHECK_FALSE(fs::exists(m.cached() + ".part"));
  CHECK_FALSE(fs::exists(m.cached() + ".part.want"));
}

TEST_CASE("an image that does not match the publisher's checksum is refused and nothing is cached", "[image]") {
  Mirror m;
  m.write_sums(std::string(64, 'a'));
  RunResult r = m.fetch();
  INFO(r.output);
  CHECK(r.status != 0);
  CHECK(r.output.find("checksum mismatch for " + std::string(kFile)) != std::string::npos);
  CHECK(r.output.find("says " + std::string(64, 'a')) != std::string::npos);
  CHECK(r.output.find(m.checksum) != std::string::npos);  // what the download has
  CHECK_FALSE(fs::exists(m.cached()));
  CHECK_FALSE(fs::exists(m.cached() + ".part"));
  CHECK_FALSE(fs::exists(m.cached() + ".part.want"));
  CHECK_FALSE(fs::exists(m.cached() + ".sha256"));
  RunResult path = [&] {
    test::ScopedEnv xdg("XDG_CACHE_HOME", m.cache());
    return run_command({test::gate_binary(), "image", "path", "--base", "ubuntu-24.04"});
  }();
  CHECK(path.status == 1);  // nothing there
}

TEST_CASE("gate image build says clearly what is wrong with a mirror", "[image]") {
  Mirror m;
  SECTION("nobody listening") {
    RunResult r = m.fetch("http://127.0.0.1:1/");
    INFO(r.output);
    CHECK(r.status != 0);
    CHECK(r.output.find("cannot fetch the checksum file http://127.0.0.1:1/releases/24.04/release/SHA256SUMS") !=
          std::string::npos);
  }
  SECTION("a mirror without the release") {
    RunResult r = m.fetch(m.url() + "nothing-here");
    INFO(r.output);
    CHECK(r.status != 0);
    CHECK(r.output.find("HTTP 404") != std::string::npos);
  }
  SECTION("not a URL") {
    RunResult r = m.fetch("ftp://127.0.0.1/");
    INFO(r.output);
    CHECK(r.status == 2);
    CHECK(r.output.find("not an http:// or https:// URL") != std::string::npos);
  }
}

TEST_CASE("a signed checksum file is checked with gpgv when the publisher's key is here", "[image]") {
  Mirror m;
  m.sign_sums();
  SECTION("signed by the key: downloaded and cached") {
    RunResult r = m.fetch();
    INFO(r.output);
    REQUIRE(r.status == 0);
    CHECK(r.output.find("SHA256SUMS is signed by a key of " + m.keyring) != std::string::npos);
    CHECK(read_file(m.cached()) == read_file(m.image()));
  }
  SECTION("changed after signing: refused, nothing downloaded or cached") {
    std::ofstream(m.root() + "/" + kDir + "SHA256SUMS", std::ios::app)
        << std::string(64, 'c') << " *another.img\n";
    RunResult r = m.fetch();
    INFO(r.output);
    CHECK(r.status != 0);
    CHECK(r.output.find("is not signed by a key of " + m.keyring) != std::string::npos);
    CHECK(r.output.find("gpgv says:") != std::string::npos);
    CHECK(m.image_gets() == 0);
    CHECK_FALSE(fs::exists(m.cached()));
  }
  SECTION("the signature missing while the key is here: refused") {
    fs::remove(m.root() + "/" + kDir + "SHA256SUMS.gpg");
    RunResult r = m.fetch();
    INFO(r.output);
    CHECK(r.status != 0);
    CHECK(r.output.find("cannot fetch the signature") != std::string::npos);
    CHECK(m.image_gets() == 0);
  }
  SECTION("another key's keyring: refused") {
    Mirror other;
    other.sign_sums();
    m.keyring = other.keyring;
    RunResult r = m.fetch();
    INFO(r.output);
    CHECK(r.status != 0);
    CHECK(r.output.find("is not signed by a key of") != std::string::npos);
    CHECK(m.image_gets() == 0);
  }
}

TEST_CASE("without the publisher's key the signature is not checked and gate says so", "[image]") {
  Mirror m;
  m.sign_sums();
  SECTION("Ubuntu's keyring not installed") {
    if (fs::exists("/usr/share/keyrings/ubuntu-cloudimage-keyring.gpg")) return;  // (it would refuse our key)
    m.keyring = "";
    RunResult r = m.fetch();
    INFO(r.output);
    REQUIRE(r.status == 0);
    CHECK(r.output.find("the signature of SHA256SUMS is not checked: no key in "
                        "/usr/share/keyrings/ubuntu-cloudimage-keyring.gpg") != std::string::npos);
    CHECK(r.output.find("GATE_IMAGE_KEYRING") != std::string::npos);
  }
  SECTION("checking turned off") {
    m.keyring = "none";
    RunResult r = m.fetch();
    INFO(r.output);
    REQUIRE(r.status == 0);
    CHECK(r.output.find("is not checked (GATE_IMAGE_KEYRING=none)") != std::string::npos);
  }
  SECTION("a keyring named but not there: refused") {
    m.keyring = m.dir.path() + "/moved-away.gpg";
    RunResult r = m.fetch();
    INFO(r.output);
    CHECK(r.status != 0);
    CHECK(r.output.find("GATE_IMAGE_KEYRING names " + m.keyring + ", which is not there") != std::string::npos);
    CHECK(m.image_gets() == 0);
  }
}

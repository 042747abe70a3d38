#include "vm/image_fetch.h"

#include <openssl/evp.h>
#include <unistd.h>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "core/files.h"
#include "core/process.h"
#include "core/token.h"
#include "gate/version.h"

namespace gate::vm {

namespace fs = std::filesystem;
namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = net::ip::tcp;
using Clock = std::chrono::steady_clock;

namespace {

constexpr int kMaxRedirects = 5;
constexpr std::size_t kMaxSumsBytes = 1 << 20;

// Ubuntu's cloud image signing key, as its ubuntu-keyring package installs it.
constexpr const char* kUbuntuKeyring = "/usr/share/keyrings/ubuntu-cloudimage-keyring.gpg";

// The publishers' sites, and where each base's image lies below them.
struct Publisher {
  const char* base;
  const char* site;
  const char* dir;
  const char* file;
  const char* sums;
  int bits;
  const char* signature;  // "": unsigned
  const char* keyring;
};
constexpr Publisher kPublishers[] = {
    {"ubuntu-24.04", "https://cloud-images.ubuntu.com", "releases/24.04/release/",
     "ubuntu-24.04-server-cloudimg-amd64.img", "SHA256SUMS", 256, "SHA256SUMS.gpg", kUbuntuKeyring},
    {"ubuntu-22.04", "https://cloud-images.ubuntu.com", "releases/22.04/release/",
     "ubuntu-22.04-server-cloudimg-amd64.img", "SHA256SUMS", 256, "SHA256SUMS.gpg", kUbuntuKeyring},
    {"debian-12-cloud", "https://cloud.debian.org/images/cloud", "bookworm/latest/",
     "debian-12-generic-amd64.qcow2", "SHA512SUMS", 512, "", ""},
};

std::string mib(std::uint64_t bytes) {
  char b[32];
  std::snprintf(b, sizeof b, "%.1f MiB", static_cast<double>(bytes) / (1024 * 1024));
  return b;
}

// What a response said before its body.
struct Head {
  int status = 0;
  std::string location;
  std::optional<std::uint64_t> length;       // of this body
  std::optional<std::uint64_t> range_start;  // Content-Range: bytes START-END/TOTAL
  std::optional<std::uint64_t> total;        // the whole file (200: its length)
};

using OnHead = std::function<bool(const Head&)>;  // false: not the body
using OnData = std::function<Status(const char* data, std::size_t n)>;

void parse_content_range(const std::string& v, Head& h) {
  unsigned long long start = 0, end = 0, total = 0;
  if (std::sscanf(v.c_str(), "bytes %llu-%llu/%llu", &start, &end, &total) == 3) {
    h.range_start = start;
    h.total = total;
  } else if (std::sscanf(v.c_str(), "bytes */%llu", &total) == 1) {  // (416)
    h.total = total;
  }
}

// The Host header: the port unless it is the scheme's, brackets around IPv6.
std::string host_header(const Url& u) {
  std::string h = u.host.find(':') != std::string::npos ? "[" + u.host + "]" : u.host;
  if (u.port != (u.tls ? "443" : "80")) h += ":" + u.port;
  return h;
}

template <class Stream>
net::awaitable<Status> exchange(Stream& stream, const Url& u, std::uint64_t from, std::chrono::seconds timeout,
                                Head& head, const OnHead& on_head, const OnData& on_data) {
  beast::error_code ec;
  auto& socket = beast::get_lowest_layer(stream);
  auto with = net::redirect_error(net::use_awaitable, ec);
  http::request<http::empty_body> req{http::verb::get, u.target, 11};
  req.set(http::field::host, host_header(u));
  req.set(http::field::user_agent, std::string("gate/") + kVersion);
  if (from > 0) req.set(http::field::range, "bytes=" + std::to_string(from) + "-");
  socket.expires_after(timeout);
  co_await http::async_write(stream, req, with);
  if (ec) co_return Status::failure("sending the request failed: " + ec.message());
  beast::flat_buffer buffer;
  http::response_parser<http::buffer_body> parser;
  parser.body_limit(boost::none);
  socket.expires_after(timeout);
  co_await http::async_read_header(stream, buffer, parser, with);
  if (ec) co_return Status::failure("no answer: " + ec.message());
  const auto& res = parser.get();
  head.status = res.result_int();
  head.location = std::string(res[http::field::location]);
  if (auto n = parser.content_length()) head.length = *n;
  if (head.status == 200) head.total = head.length;
  if (head.status == 206 || head.status == 416)
    parse_content_range(std::string(res[http::field::content_range]), head);
  if (!on_head(head)) co_return Status{};
  // Read as it comes, the time-out renewed at each read: a slow link is not a dead one.
  std::vector<char> chunk(64 * 1024);
  while (!parser.is_done()) {
    parser.get().body().data = chunk.data();
    parser.get().body().size = chunk.size();
    socket.expires_after(timeout);
    co_await http::async_read_some(stream, buffer, parser, with);
    if (ec == http::error::need_buffer) ec = {};
    const std::size_t n = chunk.size() - parser.get().body().size;
    if (n > 0)
      if (Status s = on_data(chunk.data(), n); !s.ok()) co_return s;
    if (ec) co_return Status::failure(ec == beast::error::timeout
                                          ? "nothing came for " + std::to_string(timeout.count()) + " s"
                                          : "the connection broke: " + ec.message());
  }
  co_return Status{};
}

// One GET of `url` from byte `from`: the head goes to on_head, which says whether the
// body is wanted; the body to on_data as it comes.
Status http_get(const Url& u, std::uint64_t from, std::chrono::seconds timeout, Head& head,
                const OnHead& on_head, const OnData& on_data) {
  net::io_context ioc;
  Status result = Status::failure("the download did not run");
  auto finish = [&](std::exception_ptr e, Status s) {
    if (e) {
      try {
        std::rethrow_exception(e);
      } catch (const std::exception& x) {
        s = Status::failure(x.what());
      }
    }
    result = std::move(s);
  };
  auto connect = [&](beast::tcp_stream& socket) -> net::awaitable<Status> {
    beast::error_code ec;
    tcp::resolver resolver(ioc);
    auto found = co_await resolver.async_resolve(u.host, u.port, net::redirect_error(net::use_awaitable, ec));
    if (ec) co_return Status::failure("cannot resolve " + u.host + ": " + ec.message());
    socket.expires_after(timeout);
    co_await socket.async_connect(found, net::redirect_error(net::use_awaitable, ec));
    if (ec) co_return Status::failure("cannot connect to " + u.host + ":" + u.port + ": " + ec.message());
    co_return Status{};
  };
  if (!u.tls) {
    beast::tcp_stream stream(ioc);
    net::co_spawn(
        ioc,
        [&]() -> net::awaitable<Status> {
          if (Status s = co_await connect(stream); !s.ok()) co_return s;
          co_return co_await exchange(stream, u, from, timeout, head, on_head, on_data);
        },
        finish);
    ioc.run();
    return result;
  }
  net::ssl::context tls(net::ssl::context::tls_client);
  tls.set_default_verify_paths();
  tls.set_verify_mode(net::ssl::verify_peer);
  beast::ssl_stream<beast::tcp_stream> stream(ioc, tls);
  if (!SSL_set_tlsext_host_name(stream.native_handle(), u.host.c_str()))
    return Status::failure("cannot set the TLS server name " + u.host);
  stream.set_verify_callback(net::ssl::host_name_verification(u.host));
  net::co_spawn(
      ioc,
      [&]() -> net::awaitable<Status> {
        if (Status s = co_await connect(beast::get_lowest_layer(stream)); !s.ok()) co_return s;
        beast::error_code ec;
        beast::get_lowest_layer(stream).expires_after(timeout);
        co_await stream.async_handshake(net::ssl::stream_base::client, net::redirect_error(net::use_awaitable, ec));
        if (ec) co_return Status::failure("TLS with " + u.host + " failed: " + ec.message());
        co_return co_await exchange(stream, u, from, timeout, head, on_head, on_data);
      },
      finish);
  ioc.run();
  return result;
}

bool is_redirect(const Head& h) { return h.status / 100 == 3 && !h.location.empty(); }

// GET with redirects followed; `url` becomes where the body came from.
Status get_following(std::string& url, std::uint64_t from, std::chrono::seconds timeout, Head& head,
                     const OnHead& on_head, const OnData& on_data) {
  for (int hop = 0;; ++hop) {
    Result<Url> u = parse_url(url);
    if (!u.ok()) return u.status();
    head = Head{};
    Status s = http_get(*u, from, timeout, head, [&](const Head& h) { return !is_redirect(h) && on_head(h); },
                        on_data);
    if (!s.ok() || !is_redirect(head)) return s;
    if (hop == kMaxRedirects)
      return Status::failure(url + " redirects more than " + std::to_string(kMaxRedirects) + " times");
    const std::string& to = head.location;
    std::string next;
    if (to.rfind("http://", 0) == 0 || to.rfind("https://", 0) == 0) next = to;
    else if (to.rfind("//", 0) == 0) next = url.substr(0, url.find("//")) + to;
    else if (to[0] == '/') next = url.substr(0, url.find('/', url.find("//") + 2)) + to;
    else next = url.substr(0, url.rfind('/') + 1) + to;
    if (u->tls && next.rfind("https://", 0) != 0)
      return Status::failure(url + " redirects to " + next + ", which is not https: refused");
    url = next;
  }
}

// Progress of one download: a line updated in place on a terminal (at most 5 times a
// second), else a line at each tenth.
class ProgressLine {
 public:
  ProgressLine(std::ostream* out, bool tty, std::string name) : out_(out), tty_(tty), name_(std::move(name)) {}
  void start(std::uint64_t have, std::optional<std::uint64_t> total) {
    have_at_start_ = have;
    total_ = total;
    started_ = Clock::now();
    next_tenth_ = total_ && *total_ ? (have * 10 / *total_ + 1) : 1;
  }
  // Ends a line shown in place, so that a message can follow on its own line.
  void interrupt() {
    if (out_ && tty_ && shown_ != Clock::time_point{}) *out_ << "\n" << std::flush;
    shown_ = {};
  }
  void update(std::uint64_t have, bool last = false) {
    if (!out_) return;
    const auto now = Clock::now();
    if (tty_) {
      if (!last && now - shown_ < std::chrono::milliseconds(200)) return;
      shown_ = now;
      *out_ << "\r" << line(have, now) << "\033[K" << (last ? "\n" : "") << std::flush;
      if (last) shown_ = {};
      return;
    }
    if (!total_ || !*total_) return;
    if (have * 10 / *total_ < next_tenth_) return;  // (the last tenth shows the whole)
    next_tenth_ = have * 10 / *total_ + 1;
    *out_ << line(have, now) << "\n" << std::flush;
  }

 private:
  std::string line(std::uint64_t have, Clock::time_point now) const {
    const double secs = std::chrono::duration<double>(now - started_).count();
    const double rate = secs > 0 ? static_cast<double>(have - have_at_start_) / secs : 0;
    std::string s = name_ + ": " + mib(have);
    if (total_ && *total_) {
      s += " of " + mib(*total_) + " (" + std::to_string(have * 100 / *total_) + "%)";
    }
    char b[64];
    std::snprintf(b, sizeof b, ", %.1f MiB/s", rate / (1024 * 1024));
    s += b;
    if (total_ && rate > 0 && have < *total_) {
      const auto eta = static_cast<long>((static_cast<double>(*total_ - have)) / rate);
      std::snprintf(b, sizeof b, ", ETA %ld:%02ld", eta / 60, eta % 60);
      s += b;
    }
    return s;
  }

  std::ostream* out_;
  bool tty_;
  std::string name_;
  std::uint64_t have_at_start_ = 0, next_tenth_ = 1;
  std::optional<std::uint64_t> total_;
  Clock::time_point started_, shown_;
};

// The first line of a small file ("" when there is none).
std::string read_text(const fs::path& p) {
  std::string s = read_file(p.string(), 4096).value_or("");
  return s.substr(0, s.find('\n'));
}

bool write_bytes(const fs::path& p, const std::string& s) {
  std::ofstream out(p, std::ios::trunc | std::ios::binary);
  out << s;
  return static_cast<bool>(out.flush());
}

bool write_text(const fs::path& p, const std::string& s) { return write_bytes(p, s + "\n"); }

std::string last_line(std::string text) {
  while (!text.empty() && text.back() == '\n') text.pop_back();
  return text.substr(text.rfind('\n') + 1);
}

// A small file (a checksum file, its signature), at most 1 MiB, into `body`. `answered`:
// a server answered (an HTTP error is an answer: the network works).
Status fetch_small(std::string url, std::chrono::seconds timeout, std::string& body, bool& answered) {
  Head head;
  Status got = get_following(
      url, 0, timeout, head, [](const Head&) { return true; },
      [&](const char* d, std::size_t n) {
        if (body.size() + n > kMaxSumsBytes) return Status::failure(url + " is larger than 1 MiB");
        body.append(d, n);
        return Status{};
      });
  answered = got.ok();
  if (got.ok() && head.status != 200) got = Status::failure("HTTP " + std::to_string(head.status));
  return got;
}

}  // namespace

bool is_cloud_base(const std::string& base) { return cloud_image(base).has_value(); }

std::optional<CloudImage> cloud_image(const std::string& base, const std::string& mirror) {
  for (const Publisher& p : kPublishers) {
    if (base != p.base) continue;
    std::string site = mirror.empty() ? p.site : mirror;
    while (!site.empty() && site.back() == '/') site.pop_back();
    CloudImage image{base, site + "/" + p.dir, p.file, p.sums, p.bits, p.signature, p.keyring};
    if (const char* k = std::getenv(kKeyringEnv); k && *k && !image.signature.empty())
      image.keyring = std::string(k) == "none" ? "" : k;
    image.keyring_named = std::getenv(kKeyringEnv) && *std::getenv(kKeyringEnv);
    return image;
  }
  return std::nullopt;
}

Result<Url> parse_url(const std::string& url) {
  Url u;
  std::string rest;
  if (url.rfind("http://", 0) == 0) rest = url.substr(7);
  else if (url.rfind("https://", 0) == 0) rest = url.substr(8), u.tls = true;
  else return Status::failure("'" + url + "' is not an http:// or https:// URL");
  const auto slash = rest.find('/');
  std::string authority = rest.substr(0, slash);
  u.target = slash == std::string::npos ? "/" : rest.substr(slash);
  u.port = u.tls ? "443" : "80";
  if (!authority.empty() && authority[0] == '[') {  // [v6]:port
    const auto close = authority.find(']');
    if (close == std::string::npos) return Status::failure("'" + url + "' has a bad host");
    if (close + 1 < authority.size() && authority[close + 1] == ':') u.port = authority.substr(close + 2);
    authority = authority.substr(1, close - 1);
  } else if (const auto colon = authority.rfind(':'); colon != std::string::npos) {
    u.port = authority.substr(colon + 1);
    authority = authority.substr(0, colon);
  }
  u.host = authority;
  if (u.host.empty() || u.port.empty() || u.port.find_first_not_of("0123456789") != std::string::npos)
    return Status::failure("'" + url + "' has a bad host or port");
  return u;
}

std::optional<std::string> checksum_for(const std::string& sums, const std::string& file) {
  std::size_t at = 0;
  while (at < sums.size()) {
    std::size_t end = sums.find('\n', at);
    if (end == std::string::npos) end = sums.size();
    std::string line = sums.substr(at, end - at);
    at = end + 1;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    const auto space = line.find(' ');
    const auto name_at = space == std::string::npos ? space : line.find_first_not_of(' ', space);
    if (space == 0 || name_at == std::string::npos) continue;
    std::string name = line.substr(name_at);
    if (!name.empty() && name[0] == '*') name.erase(0, 1);
    if (name != file) continue;
    std::string hex = line.substr(0, space);
    std::transform(hex.begin(), hex.end(), hex.begin(), [](unsigned char c) { return std::tolower(c); });
    if (hex.find_first_not_of("0123456789abcdef") == std::string::npos) return hex;
  }
  return std::nullopt;
}

Status verify_signature(const std::string& signed_text, const std::string& signature,
                        const std::string& keyring, const std::string& work_dir) {
  // Names of this call's own (two fetches of one image may run at once).
  const std::string tag = std::to_string(::getpid()) + "-" + random_token().substr(0, 8);
  const fs::path text = fs::path(work_dir) / (".signed-" + tag), sig = fs::path(work_dir) / (".signature-" + tag);
  std::error_code ec;
  Status result;
  if (!write_bytes(text, signed_text) || !write_bytes(sig, signature)) {
    result = Status::failure("cannot write in " + work_dir);
  } else {
    // gpgv's status lines, as apt reads them: one good signature by a key of the
    // keyring is enough (a publisher may sign with two keys while it changes them).
    RunResult r = run_command({"gpgv", "--status-fd", "1", "--keyring", fs::absolute(keyring).string(),
                               sig.string(), text.string()},
                              std::chrono::seconds(30));
    std::istringstream lines(r.output);
    bool good = false;
    std::string bad;
    for (std::string line; std::getline(lines, line);) {
      if (line.rfind("[GNUPG:] VALIDSIG ", 0) == 0) good = true;
      if (line.rfind("[GNUPG:] BADSIG ", 0) == 0 || line.rfind("[GNUPG:] ERRSIG ", 0) == 0 ||
          line.rfind("[GNUPG:] NODATA ", 0) == 0)
        bad = bad.empty() ? line.substr(9) : bad;
    }
    if (r.status == 127) result = Status::failure("gpgv is not installed (apt install gpgv)");
    else if (!good || bad.rfind("BADSIG", 0) == 0)
      result = Status::failure("gpgv says: " + (bad.empty() ? last_line(r.output) : bad));
  }
  fs::remove(text, ec);
  fs::remove(sig, ec);
  return result;
}

Result<std::string> file_digest(const std::string& path, int sha_bits) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return Status::failure("cannot read " + path);
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  if (!ctx || !EVP_DigestInit_ex(ctx.get(), sha_bits == 512 ? EVP_sha512() : EVP_sha256(), nullptr))
    return Status::failure("OpenSSL has no SHA-" + std::to_string(sha_bits));
  std::vector<char> buf(1 << 20);
  while (in) {
    in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    if (in.gcount() > 0) EVP_DigestUpdate(ctx.get(), buf.data(), static_cast<std::size_t>(in.gcount()));
  }
  if (in.bad()) return Status::failure("reading " + path + " failed");
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int n = 0;
  EVP_DigestFinal_ex(ctx.get(), md, &n);
  static const char* hex = "0123456789abcdef";
  std::string out;
  for (unsigned int i = 0; i < n; ++i) out += {hex[md[i] >> 4], hex[md[i] & 15]};
  return out;
}

CachePaths cache_paths(const CloudImage& image, const std::string& cache_dir) {
  const fs::path file = fs::path(cache_dir) / image.file;
  return {file, file.string() + ".sha" + std::to_string(image.sha_bits), file.string() + ".part",
          file.string() + ".part.want"};
}

Result<std::string> fetch_cloud_image(const CloudImage& image, const FetchOptions& o) {
  ProgressLine progress(o.progress, o.tty, image.file);
  auto say = [&](const std::string& line) {
    progress.interrupt();
    if (o.say) o.say(line);
  };
  std::error_code ec;
  fs::create_directories(o.cache_dir, ec);
  if (ec) return Status::failure("cannot create " + o.cache_dir + ": " + ec.message());
  const auto [final_path, sum_path, part_path, part_want] = cache_paths(image, o.cache_dir);
  const std::string sha = "SHA-" + std::to_string(image.sha_bits);

  // The cached image, if its recorded checksum is `want` and its content still has it.
  auto cached = [&](const std::optional<std::string>& want) -> bool {
    if (!fs::exists(final_path) || !fs::exists(sum_path)) return false;
    const std::string recorded = read_text(sum_path);
    if (recorded.empty() || (want && recorded != *want)) return false;
    Result<std::string> now = file_digest(final_path, image.sha_bits);
    if (!now.ok()) {
      say("the cached " + image.file + " cannot be checked (" + now.message() + ")");
      return false;
    }
    if (*now == recorded) return true;
    say("the cached " + image.file + " no longer matches its checksum; it is deleted");
    fs::remove(sum_path, ec);
    fs::remove(final_path, ec);
    return false;
  };

  if (o.offline) {
    if (cached(std::nullopt)) {
      say("using the cached " + image.file + " (verified when it was downloaded; the publisher not asked)");
      return final_path.string();
    }
    return Status::failure("no verified " + image.file + " in " + o.cache_dir + " (and the network is not "
                           "to be used): 'gate image build --base " + image.base + "' downloads it");
  }

  // 1. The publisher's checksums, and their signature where the publisher signs them.
  const std::string sums_url = image.url + image.sums;
  std::string sums;
  bool answered = false;  // (an HTTP error is an answer: the network works)
  Status got = fetch_small(sums_url, o.io_timeout, sums, answered);
  if (!got.ok()) {
    if (cached(std::nullopt)) {
      say("cannot fetch " + sums_url + " (" + got.message() + "); using the cached " + image.file +
          ", verified when it was downloaded");
      return final_path.string();
    }
    return Status::failure("cannot fetch the checksum file " + sums_url + ": " + got.message() +
                           (answered ? "" : " (no internet? --image-mirror points gate at a mirror of the "
                                            "publisher's site)"));
  }
  if (!image.signature.empty()) {
    const std::string sig_url = image.url + image.signature;
    if (image.keyring.empty()) {
      say("the signature of " + image.sums + " is not checked (" + kKeyringEnv + "=none)");
    } else if (!fs::exists(image.keyring)) {
      if (image.keyring_named)
        return Status::failure(std::string(kKeyringEnv) + " names " + image.keyring +
                               ", which is not there: nothing is trusted without its key (" + kKeyringEnv +
                               "=none checks no signature)");
      say("the signature of " + image.sums + " is not checked: no key in " + image.keyring + " (install " +
          "ubuntu-keyring, or name a keyring with " + kKeyringEnv + ")");
    } else {
      std::string sig;
      bool reached = false;
      Status s = fetch_small(sig_url, o.io_timeout, sig, reached);
      if (!s.ok() && !reached && cached(std::nullopt)) {
        say("cannot fetch " + sig_url + " (" + s.message() + "); using the cached " + image.file +
            ", verified when it was downloaded");
        return final_path.string();
      }
      if (!s.ok())
        return Status::failure("cannot fetch the signature " + sig_url + " (" + s.message() +
                               "); nothing is trusted without it while " + image.keyring + " is here");
      if (Status s = verify_signature(sums, sig, image.keyring, o.cache_dir); !s.ok())
        return Status::failure(sums_url + " is not signed by a key of " + image.keyring + ": " + s.message() +
                               "; nothing is downloaded or cached");
      say(image.sums + " is signed by a key of " + image.keyring);
    }
  }
  const std::optional<std::string> want = checksum_for(sums, image.file);
  if (!want) return Status::failure(sums_url + " lists no checksum for " + image.file);
  if (want->size() != static_cast<std::size_t>(image.sha_bits / 4))
    return Status::failure(sums_url + " gives " + image.file + " a checksum of " + std::to_string(want->size()) +
                           " hex digits, not the " + std::to_string(image.sha_bits / 4) + " of " + sha);

  // 2. The cache.
  if (cached(want)) {
    say("using the cached " + image.file + " (" + sha + " verified against " + sums_url + ")");
    return final_path.string();
  }
  if (fs::exists(final_path)) say("the publisher has a newer " + image.file + " than the cached one");

  // 3. The download, into .part, resumed where a connection broke; a part of another
  // image (the publisher's file names stay when the image changes) starts over.
  if (fs::exists(part_path) && read_text(part_want) != *want) {
    say("a partial download of another version of " + image.file + " is dropped");
    fs::remove(part_path, ec);
  }
  if (!write_text(part_want, *want)) return Status::failure("cannot write " + part_want.string());
  const std::string image_url = image.url + image.file;
  std::string last_error;
  bool complete = false;
  for (int attempt = 1; attempt <= o.attempts && !complete; ++attempt) {
    if (attempt > 1) {
      say("the download broke at " + mib(fs::exists(part_path) ? fs::file_size(part_path, ec) : 0) + " (" +
          last_error + "); resuming (attempt " + std::to_string(attempt) + " of " +
          std::to_string(o.attempts) + ")");
      // A moment's pause after the second failure in a row, growing to 8 s.
      if (attempt > 2) std::this_thread::sleep_for(std::chrono::seconds(std::min(8, 1 << (attempt - 3))));
    }
    std::uint64_t have = fs::exists(part_path) ? fs::file_size(part_path, ec) : 0;
    std::ofstream out;
    std::optional<std::uint64_t> total;
    std::string url = image_url;
    Head h;
    bool taken = false;  // the body is the image's (from `have`)
    Status s = get_following(
        url, have, o.io_timeout, h,
        [&](const Head& hd) {
          if (hd.status == 206 && hd.range_start == have) {
            out.open(part_path, std::ios::binary | std::ios::app);
          } else if (hd.status == 200) {
            have = 0;  // no resume there: from the start
            out.open(part_path, std::ios::binary | std::ios::trunc);
          } else {
            return false;
          }
          total = hd.total;
          progress.start(have, total);
          taken = true;
          return true;
        },
        [&](const char* d, std::size_t n) {
          if (out) out.write(d, static_cast<std::streamsize>(n));
          if (!out) return Status::failure("cannot write " + part_path.string() + " (disk full?)");
          have += n;
          progress.update(have);
          return Status{};
        });
    if (out.is_open()) out.close();
    if (taken && !out) s = Status::failure("cannot write " + part_path.string() + " (disk full?)");
    if (s.ok() && !taken) {
      if (h.status == 416 && have > 0 && h.total == have) {
        complete = true;  // the part is whole already; the checksum says whether it is right
        break;
      }
      if (h.status == 404) return Status::failure(image_url + " is not there (HTTP 404)");
      if (h.status == 206 || h.status == 416) fs::remove(part_path, ec);  // not where asked: from the start
      last_error = "HTTP " + std::to_string(h.status);
      continue;
    }
    if (s.ok() && total && have < *total) s = Status::failure("the body ended early");
    if (!s.ok()) {
      if (s.message().rfind("cannot write", 0) == 0)
        return Status::failure(s.message() + "; the part is kept and the next fetch resumes it");
      last_error = s.message();
      continue;
    }
    progress.update(have, /*last=*/true);
    complete = true;
  }
  if (!complete)
    return Status::failure("downloading " + image_url + " failed " + std::to_string(o.attempts) +
                           " times (last: " + last_error + "); " + part_path.string() +
                           " is kept and the next fetch resumes it");

  // 4. The checksum: a mismatch keeps nothing.
  say("checking " + image.file + " against " + sums_url + " (" + sha + ")");
  Result<std::string> digest = file_digest(part_path, image.sha_bits);
  if (!digest.ok()) return digest.status();
  if (*digest != *want) {
    fs::remove(part_path, ec);
    fs::remove(part_want, ec);
    return Status::failure("checksum mismatch for " + image.file + ": " + sums_url + " says " + *want +
                           ", the download has " + *digest + "; nothing was cached (the download is deleted)");
  }
  // The old checksum goes first: an image beside a checksum that is not its own would
  // later be taken for a damaged one.
  const fs::path sum_tmp = sum_path.string() + ".tmp";
  if (!write_text(sum_tmp, *want)) return Status::failure("cannot write " + sum_tmp.string());
  fs::remove(sum_path, ec);
  fs::rename(part_path, final_path, ec);
  if (!ec) fs::rename(sum_tmp, sum_path, ec);
  if (ec) return Status::failure("cannot put the image in " + final_path.string() + ": " + ec.message());
  fs::remove(part_want, ec);
  say("cached " + final_path.string() + " (" + mib(fs::file_size(final_path, ec)) + ", " + sha + " verified)");
  return final_path.string();
}

}  // namespace gate::vm

#pragma once
// How gate's libraries report failure, everywhere in lib/:
//   - a call that can fail and has nothing else to give returns Status;
//   - a call that can fail and gives a value returns Result<T>: the value, or a
//     failure;
//   - a failure is one or two sentences for people: what failed, why, and where
//     the callee knows it, what to try. Callers add what they were doing.
// Expected trouble (a missing file, a dead broker, a full disk) never throws
// across a library's public API; no empty string stands for success; no error
// out-parameters. Inside a module, exceptions of the libraries used (SQLiteCpp,
// Boost) are caught at the boundary and turned into a failure.
#include <string>
#include <utility>
#include <variant>

namespace gate {

class [[nodiscard]] Status {
 public:
  Status() = default;  // success
  static Status failure(std::string message) {
    Status s;
    s.failed_ = true;
    s.message_ = std::move(message);
    return s;
  }
  bool ok() const { return !failed_; }
  // Why it failed; empty on success.
  const std::string& message() const { return message_; }

 private:
  bool failed_ = false;
  std::string message_;
};

template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}  // NOLINT: a value converts implicitly
  Result(Status failure) : v_(std::move(failure)) {}  // NOLINT: so does a failure

  bool ok() const { return v_.index() == 0; }
  T& value() & { return std::get<0>(v_); }
  const T& value() const& { return std::get<0>(v_); }
  T&& value() && { return std::get<0>(std::move(v_)); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() { return value(); }
  const T& operator*() const { return value(); }
  // Why it failed; empty on success.
  const std::string& message() const {
    static const std::string none;
    return ok() ? none : std::get<1>(v_).message();
  }
  Status status() const { return ok() ? Status() : std::get<1>(v_); }

 private:
  std::variant<T, Status> v_;
};

}  // namespace gate

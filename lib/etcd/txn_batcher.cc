// TxnBatcher (txn_batcher.h).
#include "etcd/txn_batcher.h"

#include <algorithm>
#include <chrono>
#include <string>
#include <vector>

namespace gate::etcd {

namespace json = boost::json;

struct TxnBatcher::Pending {
  std::string_view group;
  Share share;
  const json::array& compares;
  const json::array& success;
  const json::array& failure;
  Retry retry;
  bool taken = false;  // in a batch
  bool done = false;   // result is its answer
  Result<TxnResult> result = Status::failure("not sent");
};

TxnBatcher::TxnBatcher(std::size_t max_batch, std::size_t max_in_flight, std::chrono::milliseconds stuck_after)
    : max_batch_(std::clamp<std::size_t>(max_batch, 1, 64)), max_in_flight_(std::max<std::size_t>(1, max_in_flight)),
      stuck_after_(stuck_after) {}

namespace {

// Whether `p` may join a batch that holds `batch` (Share says when).
template <typename P>
bool may_join(const P& p, const std::vector<P*>& batch) {
  bool decides = p.share == Share::Decides;
  for (const P* b : batch) {
    if (b->group != p.group) continue;
    if (p.share == Share::Alone || b->share == Share::Alone) return false;
    if (b->share == Share::Decides) {
      if (decides) return false;
      decides = true;
    }
  }
  return true;
}

// etcd's words for a transaction refused for its shape: nothing of it was applied.
bool refused_for_shape(const std::string& why) {
  for (const char* words : {"duplicate key given in txn request", "too many operations in txn request",
                            "request is too large"})
    if (why.find(words) != std::string::npos) return true;
  return false;
}

}  // namespace

Result<TxnResult> TxnBatcher::txn(EtcdClient& c, std::string_view group, Share share, const json::array& compares,
                                  const json::array& success, const json::array& failure, Retry retry) {
  using Clock = std::chrono::steady_clock;
  Pending me{group, share, compares, success, failure, retry};
  std::unique_lock lock(mu_);
  queue_.push_back(&me);
  while (!me.done) {
    if (me.taken) {
      cv_.wait(lock);
      continue;
    }
    const Clock::time_point now = Clock::now();
    if (!flying_.empty()) {
      // One batch out at a time; another only once the oldest out looks stuck.
      const Clock::time_point stuck_at = *std::min_element(flying_.begin(), flying_.end()) + stuck_after_;
      if (flying_.size() >= max_in_flight_) {
        cv_.wait(lock);
        continue;
      }
      if (now < stuck_at) {
        cv_.wait_until(lock, stuck_at);
        continue;
      }
    }
    // This thread sends the next batch: itself, then the oldest waiting ones that may
    // join it; the Appends first (txn_batcher.h).
    std::vector<Pending*> batch{&me};
    me.taken = true;
    for (Pending* p : queue_) {
      if (batch.size() == max_batch_) break;
      if (p == &me || !may_join(*p, batch)) continue;
      p->taken = true;
      batch.push_back(p);
    }
    std::erase_if(queue_, [](const Pending* p) { return p->taken; });
    std::stable_partition(batch.begin(), batch.end(), [](const Pending* p) { return p->share == Share::Append; });
    flying_.push_back(now);
    lock.unlock();
    try {
      send(c, batch);
    } catch (const std::exception& e) {
      for (Pending* p : batch) p->result = Status::failure(std::string("a batch of etcd transactions failed: ") + e.what());
    }
    lock.lock();
    flying_.erase(std::find(flying_.begin(), flying_.end(), now));
    for (Pending* p : batch) p->done = true;
    cv_.notify_all();
  }
  return std::move(me.result);
}

std::size_t TxnBatcher::waiting() const {
  std::lock_guard lock(mu_);
  return queue_.size();
}

void TxnBatcher::send(EtcdClient& c, const std::vector<Pending*>& batch) {
  ++batches_;
  transactions_ += batch.size();
  const auto started = std::chrono::steady_clock::now();
  struct Timed {  // (however send returns)
    std::atomic<std::uint64_t>& total;
    std::chrono::steady_clock::time_point since;
    ~Timed() {
      total += static_cast<std::uint64_t>(
          std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - since).count());
    }
  } timed{call_micros_, started};
  if (batch.size() == 1) {
    Pending& p = *batch.front();
    p.result = c.txn(p.compares, p.success, p.failure, p.retry);
    return;
  }
  json::array nested;
  Retry retry = Retry::Idempotent;
  for (const Pending* p : batch) {
    nested.push_back(json::object{{"request_txn", txn_request(p->compares, p->success, p->failure)}});
    if (p->retry == Retry::Once) retry = Retry::Once;  // as the most careful of them
  }
  Result<TxnResult> r = c.txn({}, nested, {}, retry);
  if (!r.ok() && refused_for_shape(r.message())) {
    // etcd refused the batch for its shape, so nothing was applied: each alone has its
    // own answer (a refusal of its own is its own).
    for (Pending* p : batch) p->result = c.txn(p->compares, p->success, p->failure, p->retry);
    batches_ += batch.size();
    return;
  }
  for (std::size_t i = 0; i < batch.size(); ++i) {
    Pending& p = *batch[i];
    if (!r.ok()) {
      p.result = r.status();
      continue;
    }
    const json::object* sub = nullptr;
    if (i < r->responses.size() && r->responses[i].is_object())
      if (const json::value* t = r->responses[i].as_object().if_contains("response_txn"); t && t->is_object())
        sub = &t->as_object();
    if (!sub) {
      p.result = Status::failure("etcd answered a batch of " + std::to_string(batch.size()) +
                                 " transactions without the answer of transaction " + std::to_string(i));
      continue;
    }
    p.result = decode_txn(*sub, r->revision);  // (the nested answers' headers are empty)
  }
}

}  // namespace gate::etcd

#include "btx/model/distributed.h"

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <cstdlib>
#include <thread>

namespace btx::model {

struct DataParallel::Impl {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::ProcessGroupGloo> group;
};

DataParallel::DataParallel(DistConfig cfg) : cfg_(std::move(cfg)), impl_(std::make_unique<Impl>()) {}
DataParallel::~DataParallel() = default;

namespace {

StatusOr<int64_t> EnvInt(const char* name, int64_t def, int64_t lo, int64_t hi) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return def;
  char* end = nullptr;
  const long long x = std::strtoll(v, &end, 10);
  if (*end != '\0' || x < lo || x > hi) {
    return InvalidArgument(std::string(name) + ": got '" + v + "'; expected an integer in [" + std::to_string(lo) + ", " +
                           std::to_string(hi) + "]");
  }
  return static_cast<int64_t>(x);
}

// Errors of a collective (a rank that died, a timeout) surface as exceptions from c10d.
template <typename F>
Status Collective(const char* what, F&& f) {
  try {
    f();
    return Status::Ok();
  } catch (const std::exception& e) {
    return Internal(std::string(what) + " failed (another rank died or timed out?): " + e.what());
  }
}

}  // namespace

StatusOr<DistConfig> DistConfigFromEnv() {
  DistConfig c;
  BTX_ASSIGN_OR_RETURN(int64_t world, EnvInt("BTX_WORLD_SIZE", 1, 1, 4096));
  c.world_size = static_cast<int>(world);
  if (c.world_size == 1) return c;
  BTX_ASSIGN_OR_RETURN(int64_t rank, EnvInt("BTX_RANK", -1, 0, world - 1));
  c.rank = static_cast<int>(rank);
  BTX_ASSIGN_OR_RETURN(int64_t timeout, EnvInt("BTX_DIST_TIMEOUT_S", 300, 1, 86400));
  c.timeout = std::chrono::seconds(timeout);
  const char* rdv = std::getenv("BTX_RENDEZVOUS");
  const std::string r = rdv ? rdv : "";
  const size_t colon = r.rfind(':');
  if (colon == std::string::npos || colon == 0) {
    return InvalidArgument("BTX_RENDEZVOUS: got '" + r + "'; expected host:port of the job's rendezvous store");
  }
  c.host = r.substr(0, colon);
  const long port = std::strtol(r.c_str() + colon + 1, nullptr, 10);
  if (port <= 0 || port > 65535) return InvalidArgument("BTX_RENDEZVOUS: '" + r + "' has no valid port");
  c.port = static_cast<int>(port);
  return c;
}

StatusOr<std::unique_ptr<DataParallel>> DataParallel::Join(const DistConfig& cfg) {
  std::unique_ptr<DataParallel> dp(new DataParallel(cfg));
  Status st = Collective("joining the process group", [&] {
    c10d::TCPStoreOptions so;
    so.port = static_cast<std::uint16_t>(cfg.port);
    so.isServer = false;
    so.waitWorkers = false;
    so.timeout = std::chrono::duration_cast<std::chrono::milliseconds>(cfg.timeout);
    dp->impl_->store = c10::make_intrusive<c10d::TCPStore>(cfg.host, so);
    auto opts = c10d::ProcessGroupGloo::Options::create(std::chrono::duration_cast<std::chrono::milliseconds>(cfg.timeout));
    // Loopback rendezvous: every rank is on this machine, so Gloo's transport binds there too.
    const bool local = cfg.host == "127.0.0.1" || cfg.host == "localhost";
    opts->devices.push_back(local ? c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1")
                                  : c10d::ProcessGroupGloo::createDefaultDevice());
    dp->impl_->group = c10::make_intrusive<c10d::ProcessGroupGloo>(dp->impl_->store, cfg.rank, cfg.world_size, opts);
  });
  if (!st.ok()) return st;
  return dp;
}

std::pair<int64_t, int64_t> DataParallel::Slice(int64_t rows) const {
  return {rows * cfg_.rank / cfg_.world_size, rows * (cfg_.rank + 1) / cfg_.world_size};
}

Status DataParallel::AllReduceGradients(const std::vector<at::Tensor>& grads, int64_t bucket_bytes) {
  return Collective("gradient all-reduce", [&] {
    size_t i = 0;
    while (i < grads.size()) {
      // One flat buffer per bucket: fewer, larger messages than one collective per parameter.
      std::vector<at::Tensor> bucket;
      int64_t bytes = 0;
      for (; i < grads.size() && (bucket.empty() || bytes < bucket_bytes); ++i) {
        bucket.push_back(grads[i]);
        bytes += grads[i].numel() * static_cast<int64_t>(grads[i].element_size());
      }
      std::vector<at::Tensor> flat = {at::cat([&] {
        std::vector<at::Tensor> views;
        for (const auto& g : bucket) views.push_back(g.reshape({-1}));
        return views;
      }())};
      impl_->group->allreduce(flat)->wait();
      int64_t off = 0;
      for (const auto& g : bucket) {
        g.copy_(flat[0].narrow(0, off, g.numel()).view_as(g));
        off += g.numel();
      }
    }
  });
}

StatusOr<double> DataParallel::Sum(double value) {
  std::vector<at::Tensor> t = {at::full({1}, value, at::kDouble)};
  BTX_RETURN_IF_ERROR(Collective("all-reduce", [&] { impl_->group->allreduce(t)->wait(); }));
  return t[0].item<double>();
}

Status DataParallel::Barrier() {
  return Collective("barrier", [&] { impl_->group->barrier()->wait(); });
}

Status ServeStore(int port, const std::function<void(int)>& on_bound, const std::function<bool()>& stop) {
  try {
    c10d::TCPStoreOptions so;
    so.port = static_cast<std::uint16_t>(port);
    so.isServer = true;
    so.waitWorkers = false;
    c10d::TCPStore store("0.0.0.0", so);
    on_bound(store.getPort());
    while (!stop()) std::this_thread::sleep_for(std::chrono::milliseconds(100));
    return Status::Ok();
  } catch (const std::exception& e) {
    return Internal(std::string("rendezvous store: ") + e.what());
  }
}

}  // namespace btx::model

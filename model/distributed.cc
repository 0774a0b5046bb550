#include "btx/model/distributed.h"

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

// NCCL groups: ProcessGroupNCCL.hpp declares its class only under USE_C10D_NCCL, which a CUDA LibTorch's CMake
// config does not export (model/CMakeLists.txt defines it for such a LibTorch); Debian's CPU LibTorch ships the
// header without the library, so both checks are needed.
#if defined(USE_C10D_NCCL) && __has_include(<torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>)
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#define BTX_HAVE_NCCL 1
#else
#define BTX_HAVE_NCCL 0
#endif

#include <cstdlib>
#include <iostream>
#include <thread>

namespace btx::model {

bool HaveNccl() { return BTX_HAVE_NCCL != 0; }

namespace {
using WorkPtr = decltype(std::declval<c10d::ProcessGroupGloo&>().barrier());
}  // namespace

struct DataParallel::Impl {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::ProcessGroupGloo> gloo;
#if BTX_HAVE_NCCL
  c10::intrusive_ptr<c10d::ProcessGroupNCCL> nccl;
#endif
  c10::Device device{c10::kCPU};  // where the group's tensors live
  std::mutex mu;                  // pending: launched from autograd's thread, waited for by the trainer's
  std::vector<WorkPtr> pending;
  std::string launch_error;

  // The one group this job uses (the two classes share no base across LibTorch versions).
  template <typename F>
  decltype(auto) Group(F&& f) {
#if BTX_HAVE_NCCL
    if (nccl) return f(*nccl);
#endif
    return f(*gloo);
  }
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
  BTX_ASSIGN_OR_RETURN(c.bucket_bytes, EnvInt("BTX_DIST_BUCKET_BYTES", c.bucket_bytes, 1024, int64_t{1} << 34));
  BTX_ASSIGN_OR_RETURN(int64_t overlap, EnvInt("BTX_DIST_OVERLAP", 1, 0, 1));
  c.overlap = overlap == 1;
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
  const c10::Device device(cfg.device);
  if (device.is_cuda() && !HaveNccl()) {
    std::cerr << "btx: this LibTorch has no NCCL; CUDA ranks sum their gradients over Gloo (through host memory)\n";
  }
  Status st = Collective("joining the process group", [&] {
    c10d::TCPStoreOptions so;
    so.port = static_cast<std::uint16_t>(cfg.port);
    so.isServer = false;
    so.waitWorkers = false;
    so.timeout = std::chrono::duration_cast<std::chrono::milliseconds>(cfg.timeout);
    dp->impl_->store = c10::make_intrusive<c10d::TCPStore>(cfg.host, so);
    const auto timeout = std::chrono::duration_cast<std::chrono::milliseconds>(cfg.timeout);
#if BTX_HAVE_NCCL
    if (device.is_cuda()) {
      auto opts = c10d::ProcessGroupNCCL::Options::create();
      opts->timeout = timeout;
      dp->impl_->nccl = c10::make_intrusive<c10d::ProcessGroupNCCL>(dp->impl_->store, cfg.rank, cfg.world_size, opts);
      dp->impl_->device = device;
      return;
    }
#endif
    auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
    // Loopback rendezvous: every rank is on this machine, so Gloo's transport binds there too. A gang's
    // ranks bind to the address the other workers reach this one at (BTX_LOCAL_ADDR, the worker's
    // --advertise-host), not to whatever the hostname resolves to (127.0.1.1 on many distributions).
    const bool local = cfg.host == "127.0.0.1" || cfg.host == "localhost";
    const char* local_addr = std::getenv("BTX_LOCAL_ADDR");
    opts->devices.push_back(local ? c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1")
                            : local_addr != nullptr && *local_addr != '\0'
                                ? c10d::ProcessGroupGloo::createDeviceForHostname(local_addr)
                                : c10d::ProcessGroupGloo::createDefaultDevice());
    dp->impl_->gloo = c10::make_intrusive<c10d::ProcessGroupGloo>(dp->impl_->store, cfg.rank, cfg.world_size, opts);
  });
  if (!st.ok()) return st;
  return dp;
}

const char* DataParallel::backend() const {
#if BTX_HAVE_NCCL
  if (impl_->nccl) return "nccl";
#endif
  return "gloo";
}

std::pair<int64_t, int64_t> DataParallel::Slice(int64_t rows) const {
  return {rows * cfg_.rank / cfg_.world_size, rows * (cfg_.rank + 1) / cfg_.world_size};
}

void DataParallel::LaunchAllReduce(const at::Tensor& t) {
  // Called from autograd's thread during backward: an exception there would abort the backward pass in a state
  // the other ranks cannot see, so it is recorded and reported by WaitAll().
  std::lock_guard<std::mutex> lock(impl_->mu);
  if (!impl_->launch_error.empty()) return;
  try {
    std::vector<at::Tensor> one = {t};
    impl_->pending.push_back(impl_->Group([&](auto& g) { return g.allreduce(one); }));
  } catch (const std::exception& e) {
    impl_->launch_error = e.what();
  }
}

Status DataParallel::WaitAll() {
  std::vector<WorkPtr> pending;
  std::string error;
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    pending.swap(impl_->pending);
    error.swap(impl_->launch_error);
  }
  Status st = Collective("gradient all-reduce", [&] {
    for (auto& w : pending) w->wait();
  });
  if (!error.empty()) return Internal("gradient all-reduce failed (another rank died or timed out?): " + error);
  return st;
}

StatusOr<double> DataParallel::Sum(double value) {
  std::vector<at::Tensor> t = {at::full({1}, value, at::TensorOptions(at::kDouble).device(impl_->device))};
  BTX_RETURN_IF_ERROR(Collective("all-reduce", [&] { impl_->Group([&](auto& g) { return g.allreduce(t); })->wait(); }));
  return t[0].cpu().item<double>();
}

Status DataParallel::AllGatherInto(const at::Tensor& mine, std::vector<at::Tensor>& outs) {
  std::vector<at::Tensor> in = {mine.contiguous()};
  std::vector<std::vector<at::Tensor>> out = {outs};
  return Collective("all-gather", [&] { impl_->Group([&](auto& g) { return g.allgather(out, in); })->wait(); });
}

StatusOr<std::vector<at::Tensor>> DataParallel::AllGather(const at::Tensor& mine) {
  at::Tensor in = mine.to(impl_->device).contiguous();
  std::vector<at::Tensor> outs;
  for (int r = 0; r < cfg_.world_size; ++r) outs.push_back(at::empty_like(in));
  BTX_RETURN_IF_ERROR(AllGatherInto(in, outs));
  for (auto& o : outs) o = o.cpu();
  return outs;
}

StatusOr<at::Tensor> DataParallel::ReduceScatter(at::Tensor& full) {
  const int64_t world = cfg_.world_size, shard = full.numel() / world;
  if (full.dim() != 1 || shard * world != full.numel()) return Internal("reduce-scatter of a tensor not [world * S]");
#if BTX_HAVE_NCCL
  if (impl_->nccl) {
    std::vector<at::Tensor> out = {at::empty({shard}, full.options())};
    std::vector<std::vector<at::Tensor>> in(1);
    for (int64_t r = 0; r < world; ++r) in[0].push_back(full.narrow(0, r * shard, shard));
    BTX_RETURN_IF_ERROR(Collective("reduce-scatter", [&] { impl_->nccl->reduce_scatter(out, in)->wait(); }));
    return out[0];
  }
#endif
  std::vector<at::Tensor> t = {full};
  BTX_RETURN_IF_ERROR(Collective("reduce-scatter (all-reduce)", [&] { impl_->gloo->allreduce(t)->wait(); }));
  return full.narrow(0, cfg_.rank * shard, shard).clone();
}

Status DataParallel::Barrier() {
  return Collective("barrier", [&] { impl_->Group([&](auto& g) { return g.barrier(); })->wait(); });
}

// ---- GradReducer ----

struct GradReducer::State {
  DataParallel* dp = nullptr;
  std::vector<at::Tensor> params;
  struct Bucket {
    std::vector<size_t> members;  // parameter indices, in reverse model order
    std::vector<int64_t> offsets;
    at::Tensor flat;
    size_t pending = 0;  // members whose gradient has not arrived
  };
  std::vector<Bucket> buckets;
  std::vector<size_t> bucket_of, slot_of;
  std::vector<char> got;
  size_t next = 0;  // buckets launch in index order, so every rank issues the same collectives
  size_t early = 0;  // of them, by the hooks during the last backward pass
  std::string twice;  // a parameter whose gradient arrived twice in one backward pass (its bucket may be gone)
  bool armed = false;
  std::mutex mu;  // hooks may run on autograd's device threads

  void Fill(size_t k, const at::Tensor& grad) {
    Bucket& b = buckets[bucket_of[k]];
    at::Tensor dst = b.flat.narrow(0, b.offsets[slot_of[k]], params[k].numel());
    if (grad.defined())
      dst.copy_(grad.reshape({-1}));
    else
      dst.zero_();  // a parameter without a gradient (on this rank) contributes zeros
    got[k] = 1;
    --b.pending;
  }
  void LaunchReady() {
    while (next < buckets.size() && buckets[next].pending == 0) {
      dp->LaunchAllReduce(buckets[next++].flat);
    }
  }
  // The hook: `g` is this backward's gradient of parameter k, before AccumulateGrad adds it to .grad. The
  // bucket gets the sum that AccumulateGrad is about to store (same float operation, so the same bits).
  void Ready(size_t k, const at::Tensor& g) {
    std::lock_guard<std::mutex> lock(mu);
    if (!armed) return;
    if (got[k]) {
      twice = std::to_string(k);
      return;
    }
    at::NoGradGuard ng;
    const at::Tensor& old = params[k].grad();
    Fill(k, old.defined() ? old + g : g);
    LaunchReady();
  }
};

GradReducer::GradReducer(DataParallel* dp, std::vector<at::Tensor> params, int64_t bucket_bytes, bool overlap)
    : state_(std::make_shared<State>()) {
  State& s = *state_;
  s.dp = dp;
  s.params = std::move(params);
  const size_t n = s.params.size();
  s.bucket_of.resize(n);
  s.slot_of.resize(n);
  s.got.assign(n, 0);
  int64_t bytes = 0;
  for (size_t i = n; i-- > 0;) {
    if (s.buckets.empty() || bytes >= bucket_bytes) {
      s.buckets.emplace_back();
      bytes = 0;
    }
    State::Bucket& b = s.buckets.back();
    const at::Tensor& p = s.params[i];
    b.offsets.push_back(b.members.empty() ? 0 : b.offsets.back() + s.params[b.members.back()].numel());
    s.bucket_of[i] = s.buckets.size() - 1;
    s.slot_of[i] = b.members.size();
    b.members.push_back(i);
    bytes += p.numel() * static_cast<int64_t>(p.element_size());
  }
  for (auto& b : s.buckets) {
    const int64_t total = b.offsets.back() + s.params[b.members.back()].numel();
    b.flat = at::zeros({total}, s.params[b.members.front()].options().requires_grad(false));
    b.pending = b.members.size();
  }
  // A single bucket can only start once backward has produced every gradient: hooks would add copies and
  // overlap nothing (measured on the tiny preset, 2 CPU ranks: 1.46x one rank with them, 1.65x without).
  if (overlap && s.buckets.size() > 1) {
    std::weak_ptr<State> weak = state_;
    for (size_t k = 0; k < n; ++k) {
      hook_ids_.push_back(s.params[k].register_hook([weak, k](const at::Tensor& g) {
        if (auto st = weak.lock()) st->Ready(k, g);
      }));
    }
  }
}

GradReducer::~GradReducer() {
  for (size_t k = 0; k < hook_ids_.size(); ++k) state_->params[k].remove_hook(hook_ids_[k]);
}

size_t GradReducer::num_buckets() const { return state_->buckets.size(); }
size_t GradReducer::launched_during_backward() const { return state_->early; }

void GradReducer::Arm() {
  std::lock_guard<std::mutex> lock(state_->mu);
  state_->armed = true;
}

Status GradReducer::Finish() {
  State& s = *state_;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    s.armed = false;
    s.early = s.next;
    at::NoGradGuard ng;
    for (size_t k = 0; k < s.params.size(); ++k)
      if (!s.got[k]) s.Fill(k, s.params[k].grad());
    s.LaunchReady();
  }
  Status st = s.dp->WaitAll();
  if (st.ok() && !s.twice.empty()) {
    st = Internal("trainable parameter #" + s.twice + " got two gradients in one backward pass, so its bucket was "
                  "summed before the second; run with BTX_DIST_OVERLAP=0");
  }
  s.twice.clear();
  // Ready for the next step whatever happened: a failed step ends the job anyway.
  std::fill(s.got.begin(), s.got.end(), 0);
  s.next = 0;
  for (auto& b : s.buckets) b.pending = b.members.size();
  if (!st.ok()) return st;
  at::NoGradGuard ng;
  for (auto& b : s.buckets) {
    for (size_t j = 0; j < b.members.size(); ++j) {
      at::Tensor& p = s.params[b.members[j]];
      at::Tensor sum = b.flat.narrow(0, b.offsets[j], p.numel()).view(p.sizes());
      if (p.grad().defined())
        p.mutable_grad().copy_(sum);
      else
        p.mutable_grad() = sum.clone();
    }
  }
  return Status::Ok();
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

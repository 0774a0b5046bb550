// NVML loading: every way it can fail must be a clear status, never a crash, because the worker
// tries it on every start, GPU or not. On a machine with an NVIDIA GPU the real devices are read.
#include "gpu_memory.h"

#include <filesystem>

#include <gtest/gtest.h>

#include "btx/common/process.h"
#include "btx/common/strings.h"
#include "btx/metrics/metrics.h"
#include "btx/worker/worker.h"

namespace btx::worker {
namespace {

bool HaveNvidiaGpu() { return std::filesystem::exists("/dev/nvidia0"); }

TEST(GpuMemoryReader, MissingLibraryIsUnavailableAndNamesIt) {
  auto r = GpuMemoryReader::Open({}, "/nonexistent/libnvidia-ml.so.1");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(r.status().message().find("/nonexistent/libnvidia-ml.so.1"), std::string::npos) << r.status();
}

TEST(GpuMemoryReader, LibraryWithoutNvmlIsUnavailableAndNamesTheMissingFunction) {
  // Any loadable library that is not NVML: the C library is always there.
  auto r = GpuMemoryReader::Open({}, "libc.so.6");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(r.status().message().find("nvmlInit_v2"), std::string::npos) << r.status();
}

TEST(GpuMemoryReader, DefaultLibraryMatchesTheMachine) {
  auto r = GpuMemoryReader::Open();
  if (!HaveNvidiaGpu()) {
    // No GPU: either no driver library at all or a driver that finds no device; both say so.
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable);
    EXPECT_FALSE(r.status().message().empty());
    return;
  }
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_GT((*r)->devices(), 0);
  const auto samples = (*r)->Read();
  ASSERT_EQ(static_cast<int>(samples.size()), (*r)->devices());
  for (size_t i = 0; i < samples.size(); ++i) {
    EXPECT_EQ(samples[i].gpu, static_cast<int>(i));
    EXPECT_GT(samples[i].total_bytes, int64_t{1} << 30) << "GPU " << i;
    EXPECT_GE(samples[i].used_bytes, 0);
    EXPECT_LE(samples[i].used_bytes, samples[i].total_bytes);
  }
}

// The worker's GPU i is CUDA's device i; NVML must read that same device, found by PCI bus id.
TEST(GpuMemoryReader, CudaDevicesAreFoundByPciBusId) {
  if (!HaveNvidiaGpu()) GTEST_SKIP() << "needs an NVIDIA GPU (/dev/nvidia0)";
  const Capabilities caps = DiscoverCapabilities();
  ASSERT_GT(caps.gpus(), 0) << "the CUDA driver found no device";
  ASSERT_EQ(static_cast<int>(caps.gpu_pci_bus_ids.size()), caps.gpus());
  auto r = GpuMemoryReader::Open(caps.gpu_pci_bus_ids);
  ASSERT_TRUE(r.ok()) << r.status();
  const auto samples = (*r)->Read();
  ASSERT_EQ(static_cast<int>(samples.size()), caps.gpus());
  for (const auto& s : samples) {
    // CUDA leaves out what the driver reserves; the two totals agree to a few percent.
    const double cuda_total = static_cast<double>(caps.gpu_memory_bytes[s.gpu]);
    EXPECT_NEAR(static_cast<double>(s.total_bytes) / cuda_total, 1.0, 0.05)
        << "GPU " << s.gpu << " (" << caps.gpu_pci_bus_ids[s.gpu] << "): NVML " << s.total_bytes << ", CUDA " << cuda_total;
  }
}

TEST(GpuMemoryReader, UnknownPciBusIdIsSkippedNotMisattributed) {
  if (!HaveNvidiaGpu()) GTEST_SKIP() << "needs an NVIDIA GPU (/dev/nvidia0)";
  auto all = GpuMemoryReader::Open();
  ASSERT_TRUE(all.ok()) << all.status();
  // A bus id no device has: that index gets no samples, and with no device left Open says so.
  auto none = GpuMemoryReader::Open({"ffff:ff:1f.7"});
  ASSERT_FALSE(none.ok());
  EXPECT_NE(none.status().message().find("ffff:ff:1f.7"), std::string::npos) << none.status();
}

// What Prometheus sees from a worker: GPU memory series for each GPU where there is one, no
// GPU families at all where there is none, and an exposition promtool accepts either way. The
// worker reads GPU memory when it is built, before it ever talks to a scheduler.
TEST(WorkerGpuMetrics, SeriesExistExactlyWhereThereIsAGpu) {
  metrics::Registry registry;
  PosixProcessLauncher launcher;
  SystemClock clock;
  WorkerConfig cfg;
  cfg.name = "probe";
  auto channel = grpc::CreateChannel("127.0.0.1:1", grpc::InsecureChannelCredentials());
  std::string text;
  {
    Worker worker(cfg, channel, launcher, clock, &registry);
    text = registry.Serialize();
  }
  if (!HaveNvidiaGpu()) {
    EXPECT_EQ(text.find("btx_worker_gpu_memory"), std::string::npos) << text;
  } else {
    const int gpus = DiscoverCapabilities().gpus();
    ASSERT_GT(gpus, 0);
    for (int i = 0; i < gpus; ++i) {
      for (const char* name : {"btx_worker_gpu_memory_used_bytes", "btx_worker_gpu_memory_total_bytes"}) {
        EXPECT_NE(text.find(Cat(name, "{worker=\"probe\",gpu=\"", i, "\"} ")), std::string::npos) << name << "\n" << text;
      }
    }
  }
  std::string promtool;
  if (const char* env = std::getenv("PROMTOOL"); env && *env) promtool = env;
  if (promtool.empty()) promtool = FindOnPath("promtool");
  if (promtool.empty()) GTEST_SKIP() << "promtool is not installed (Debian package prometheus); exposition not linted";
  ProcessSpec ps;
  ps.argv = {"/bin/sh", "-c", Cat("printf '%s' \"$1\" | '", promtool, "' check metrics"), "sh", text};
  PosixProcessLauncher runner;
  auto lint = RunAndCapture(runner, ps);
  ASSERT_TRUE(lint.ok()) << lint.status();
  EXPECT_EQ(lint->exit_code, 0) << lint->output << "\n" << text;
}

}  // namespace
}  // namespace btx::worker

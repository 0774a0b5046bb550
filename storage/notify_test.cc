// LISTEN/NOTIFY between two connections, as two scheduler replicas use it.
#include "btx/storage/notify.h"

#include <chrono>

#include <gtest/gtest.h>

#include "pg_fixture.h"

namespace btx::storage {
namespace {
using namespace std::chrono_literals;

TEST(Notify, AListenerHearsEachChannelItListensOn) {
  const std::string conninfo = btx::testing::NewMigratedDatabase();
  int jobs = 0, events = 0;
  NotifyListener listener(conninfo, {{kJobsChannel, [&] { ++jobs; }}, {kEventsChannel, [&] { ++events; }}});
  // The first Wait connects and LISTENs; nothing was sent yet.
  ASSERT_TRUE(listener.Wait(0ms).ok());
  EXPECT_EQ(jobs + events, 0);

  NotifySender sender(conninfo);
  ASSERT_TRUE(sender.Notify({kJobsChannel}).ok());
  // Waits end as soon as a notification arrives; the deadline only bounds a broken test.
  const auto deadline = std::chrono::steady_clock::now() + 10s;
  while (jobs == 0 && std::chrono::steady_clock::now() < deadline) ASSERT_TRUE(listener.Wait(1s).ok());
  EXPECT_EQ(jobs, 1);
  EXPECT_EQ(events, 0);

  ASSERT_TRUE(sender.Notify({kJobsChannel, kEventsChannel}).ok());
  while (events == 0 && std::chrono::steady_clock::now() < deadline) ASSERT_TRUE(listener.Wait(1s).ok());
  EXPECT_EQ(events, 1);
  while (jobs < 2 && std::chrono::steady_clock::now() < deadline) ASSERT_TRUE(listener.Wait(1s).ok());
  EXPECT_EQ(jobs, 2);
  EXPECT_TRUE(sender.Notify({}).ok());
}

TEST(Notify, AnUnreachableDatabaseIsUnavailableAndRetriedOnTheNextCall) {
  const std::string nowhere = "host=/nonexistent-btx-socket-dir dbname=btx connect_timeout=1";
  NotifySender sender(nowhere);
  EXPECT_EQ(sender.Notify({kJobsChannel}).code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(sender.Notify({kJobsChannel}).code(), absl::StatusCode::kUnavailable);
  NotifyListener listener(nowhere, {{kJobsChannel, [] {}}});
  EXPECT_EQ(listener.Wait(0ms).code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(listener.Wait(0ms).code(), absl::StatusCode::kUnavailable);
}

}  // namespace
}  // namespace btx::storage

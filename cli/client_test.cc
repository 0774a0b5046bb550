#include "client.h"

#include <gtest/gtest.h>

#include "btx/common/strings.h"

#include "exit_codes.h"

namespace btx::cli {
namespace {

TEST(ClientErrorsTest, UnreachableNamesTheServerAndTheFix) {
  absl::Status s = FromGrpc(grpc::Status(grpc::StatusCode::UNAVAILABLE, "connection refused"), "list pipelines", "h:1");
  EXPECT_EQ(ExitCodeFor(s), kExitUnreachable);
  EXPECT_EQ(s.message(),
            "cannot reach the scheduler at h:1 (connection refused); start it, or point --server / BTX_SERVER at a "
            "running one");
}

TEST(ClientErrorsTest, FieldViolationsSurviveTheConversion) {
  grpc::Status rich = ToGrpcStatus(InvalidFields({{"experts[0].steps", "got -1"}, {"name", "missing"}}));
  absl::Status s = FromGrpc(rich, "submit", "h:1");
  EXPECT_EQ(ExitCodeFor(s), kExitUsage);
  auto v = ViolationsOf(s);
  ASSERT_EQ(v.size(), 2u);
  EXPECT_EQ(v[0].field, "experts[0].steps");
  EXPECT_EQ(v[0].description, "got -1");
  EXPECT_TRUE(ViolationsOf(absl::InvalidArgumentError("plain")).empty());
}

TEST(ClientErrorsTest, CodesMapToDocumentedExitCodes) {
  auto code = [](grpc::StatusCode c) { return ExitCodeFor(FromGrpc(grpc::Status(c, "m"), "x", "h")); };
  EXPECT_EQ(code(grpc::StatusCode::NOT_FOUND), kExitNotFound);
  EXPECT_EQ(code(grpc::StatusCode::FAILED_PRECONDITION), kExitRefused);
  EXPECT_EQ(code(grpc::StatusCode::UNAUTHENTICATED), kExitRefused);
  EXPECT_EQ(code(grpc::StatusCode::PERMISSION_DENIED), kExitRefused);
  EXPECT_EQ(code(grpc::StatusCode::DEADLINE_EXCEEDED), kExitUnreachable);
  EXPECT_EQ(code(grpc::StatusCode::INTERNAL), kExitFailed);
  EXPECT_EQ(code(grpc::StatusCode::CANCELLED), kExitInterrupted);
  EXPECT_NE(FromGrpc(grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "bad token"), "get", "h").message().find("--token"),
            absl::string_view::npos);
}

TEST(ClientErrorsTest, IsUuid) {
  EXPECT_TRUE(IsUuid("6c1e2a4b-0000-4000-8000-000000000001"));
  EXPECT_FALSE(IsUuid("6c1e2a4b"));
  EXPECT_FALSE(IsUuid("6c1e2a4b-0000-4000-8000-00000000000g"));
}

}  // namespace
}  // namespace btx::cli

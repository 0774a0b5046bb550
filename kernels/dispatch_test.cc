#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <array>
#include <vector>

#include "btx/kernels/moe.h"
#include "test_util.h"

namespace btx::kernels {
namespace {

class Dispatch : public testing::SeededTest {};

TEST_F(Dispatch, StableCountingSortByExpert) {
  for (auto [tokens, experts, k] : std::vector<std::array<int64_t, 3>>{{1, 3, 1}, {100, 7, 2}, {0, 4, 2}, {64, 32, 4}}) {
    const at::Tensor index = at::randint(experts, {tokens, k}, at::kLong);
    const DispatchPlan plan = make_dispatch_plan(index, experts);
    EXPECT_EQ(plan.dropped, 0);
    ASSERT_EQ(plan.offsets.numel(), experts + 1);
    ASSERT_EQ(plan.sorted_assign.numel(), tokens * k);
    // Reference: for each expert, its assignments in flat (token-major) order.
    std::vector<int64_t> expected;
    std::vector<int64_t> offsets{0};
    for (int64_t e = 0; e < experts; ++e) {
      for (int64_t a = 0; a < tokens * k; ++a) {
        if (index.view({-1})[a].item<int64_t>() == e) expected.push_back(a);
      }
      offsets.push_back(static_cast<int64_t>(expected.size()));
    }
    for (int64_t e = 0; e <= experts; ++e) EXPECT_EQ(plan.offsets[e].item<int64_t>(), offsets[e]);
    for (int64_t i = 0; i < tokens * k; ++i) {
      EXPECT_EQ(plan.sorted_assign[i].item<int64_t>(), expected[i]);
      EXPECT_EQ(plan.row_of_assign[expected[i]].item<int64_t>(), i);
    }
  }
}

TEST_F(Dispatch, CapacityKeepsEarliestTokens) {
  // 6 tokens, k = 1, everything on expert 1: capacity ceil(0.5 * 6 / 2) = 2 keeps tokens 0 and 1.
  const at::Tensor index = at::ones({6, 1}, at::kLong);
  const DispatchPlan plan = make_dispatch_plan(index, 2, 0.5);
  EXPECT_EQ(plan.dropped, 4);
  EXPECT_TRUE(at::equal(plan.offsets, at::tensor({0, 0, 2}, at::kLong)));
  EXPECT_TRUE(at::equal(plan.sorted_assign, at::tensor({0, 1}, at::kLong)));
  EXPECT_TRUE(at::equal(plan.row_of_assign, at::tensor({0, 1, -1, -1, -1, -1}, at::kLong)));
}

TEST_F(Dispatch, RejectsOutOfRangeExperts) {
  EXPECT_THROW(make_dispatch_plan(at::full({2, 1}, 3, at::kLong), 3), c10::Error);
  EXPECT_THROW(make_dispatch_plan(at::full({2, 1}, -1, at::kLong), 3), c10::Error);
}

}  // namespace
}  // namespace btx::kernels

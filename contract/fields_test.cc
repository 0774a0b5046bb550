#include "btx/contract/fields.h"

#include <gtest/gtest.h>

namespace btx::contract {
namespace {
using json = nlohmann::json;

TEST(Reader, UnknownKeysAreErrorsThatListTheAllowedOnesAndHintAtTheRightName) {
  FieldErrors errors;
  Reader r(errors);
  EXPECT_TRUE(r.Object("seed.init", json{{"num_layers", 4}, {"preset", "tiny"}}, {"preset", "num_hidden_layers"},
                       {{"num_layers", "num_hidden_layers"}}));
  ASSERT_EQ(errors.size(), 1u);
  EXPECT_EQ(errors[0].path, "seed.init.num_layers");
  EXPECT_NE(errors[0].message.find("did you mean num_hidden_layers?"), std::string::npos) << errors[0].message;
  EXPECT_NE(errors[0].message.find("expected one of: preset, num_hidden_layers"), std::string::npos);
}

TEST(Reader, NumbersHonourOpenAndClosedBounds) {
  FieldErrors errors;
  Reader r(errors);
  const json t = {{"lr", 0}, {"ratio", 1}, {"beta", 1.0}};
  EXPECT_EQ(r.Num(t, "train", "lr", 3e-4, {0, 10, true, false}), 3e-4);
  EXPECT_EQ(r.Num(t, "train", "ratio", 0.1, {0, 1}), 1);
  r.Num(t, "train", "beta", 0.9, {0, 1, false, true});
  ASSERT_EQ(errors.size(), 2u);
  EXPECT_EQ(errors[0].path, "train.lr");
  EXPECT_EQ(errors[0].message, "got 0; expected a number in (0, 10]");
  EXPECT_EQ(errors[1].message, "got 1.0; expected a number in [0, 1)");
}

TEST(Reader, MissingAndNullTakeTheDefaultAndWrongTypesAreNamed) {
  FieldErrors errors;
  Reader r(errors);
  const json t = {{"a", nullptr}, {"b", "7"}, {"c", 2.5}, {"d", 9}};
  EXPECT_EQ(r.Int(t, "x", "a", 3, 0, 10), 3);
  EXPECT_EQ(r.Int(t, "x", "missing", 4, 0, 10), 4);
  EXPECT_EQ(r.Int(t, "x", "b", 5, 0, 10), 5);
  EXPECT_EQ(r.Int(t, "x", "c", 6, 0, 10), 6);
  EXPECT_EQ(r.Int(t, "x", "d", 1, 0, 8), 1);
  ASSERT_EQ(errors.size(), 3u);
  EXPECT_EQ(errors[0].path, "x.b");
  EXPECT_EQ(errors[1].path, "x.c");
  EXPECT_EQ(errors[2].message, "got 9; expected an integer in [0, 8]");
}

TEST(Reader, PathsTakeOneOrAListAndArtifactReferencesOnlyWhenAllowed) {
  FieldErrors errors;
  Reader strict(errors);
  EXPECT_EQ(strict.Paths(json("/a"), "data.train"), std::vector<std::string>{"/a"});
  EXPECT_EQ(strict.Paths(json::array({"/a", "/b"}), "data.train").size(), 2u);
  strict.Paths(json::array({"/a", 3}), "data.train");
  strict.Path(json{{"$artifact", "merge"}}, "model");
  ASSERT_EQ(errors.size(), 2u);
  EXPECT_EQ(errors[0].path, "data.train[1]");
  EXPECT_EQ(errors[1].path, "model");

  FieldErrors more;
  Reader refs(more, true);
  EXPECT_EQ(refs.Path(json{{"$artifact", "merge"}}, "model"), R"({"$artifact":"merge"})");
  refs.Path(json{{"$artifact", 1}}, "model");
  EXPECT_EQ(more.size(), 1u);
}

TEST(Reader, LongValuesAreCutOutsideACharacter) {
  FieldErrors errors;
  Reader r(errors);
  r.Int(json{{"k", std::string(40, 'a') + "\xc3\xa9\xc3\xa9\xc3\xa9" + std::string(60, 'b')}}, "", "k", 0, 0, 1);
  ASSERT_EQ(errors.size(), 1u);
  EXPECT_NE(errors[0].message.find("...; expected"), std::string::npos);
  EXPECT_EQ(Describe(errors).find("k: got"), 0u);
}

}  // namespace
}  // namespace btx::contract

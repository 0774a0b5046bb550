// Internal to btx_model: a chart as a list of shapes (rectangles, axis-parallel lines, text), built once and
// written either as SVG (eval_report.cc) or rasterised to PNG (chart_png.cc).
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace btx::model {

struct Shape {
  enum Kind { kRect, kLine, kText } kind = kRect;
  double x = 0, y = 0, w = 0, h = 0;  // rect; line from (x, y) to (x + w, y + h), horizontal or vertical
  uint32_t rgb = 0;
  double stroke = 1;
  bool dashed = false;
  std::string text;  // text: baseline at y; anchor 0 start, 1 middle, 2 end
  int anchor = 0;
  bool bold = false;
  std::string title;                                       // rect: tooltip
  std::vector<std::pair<std::string, std::string>> data;  // rect: data-* attributes
};
struct Scene {
  double w = 0, h = 0;
  std::vector<Shape> shapes;
};

constexpr double kCharW = 6;  // advance of the 10-unit monospace font (and of the bitmap font's 5x7 glyphs + 1)

// False when the build has no zlib to deflate the image (only SVG charts then).
bool PngAvailable();
// The scene at `scale` pixels per unit as an 8-bit RGB PNG; empty without zlib.
std::string RenderPng(const Scene& scene, int scale);

}  // namespace btx::model

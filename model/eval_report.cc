// Reports of an evaluation: plain-text tables and routing charts (a Scene written as SVG text here, rasterised
// to PNG by chart_png.cc). No plotting or image library is involved.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "btx/model/eval.h"
#include "chart.h"

namespace btx::model {
using nlohmann::json;

namespace {

std::string Fmt(const char* f, double v) {
  char b[64];
  std::snprintf(b, sizeof b, f, v);
  return b;
}

std::string Pad(const std::string& s, size_t w, bool right) {
  if (s.size() >= w) return s;
  return right ? std::string(w - s.size(), ' ') + s : s + std::string(w - s.size(), ' ');
}

double Num(const json& j, const char* key, double def = NAN) {
  return j.is_object() && j.contains(key) && j[key].is_number() ? j[key].get<double>() : def;
}

// An MoE model's routing as the charts and tables use it.
struct ModelRouting {
  std::string model;
  std::vector<std::string> domains, experts;  // domains that have routing; expert display names
  bool named = false;                         // experts carry real names, not "expert N"
  std::vector<std::vector<std::vector<double>>> share;  // [layer][domain][expert]
  int64_t top_k = 0;
};

std::vector<ModelRouting> CollectRouting(const json& eval) {
  std::vector<ModelRouting> out;
  if (!eval.is_object() || !eval.contains("models") || !eval["models"].is_object()) return out;
  std::vector<std::string> order;
  if (eval.contains("domains") && eval["domains"].is_array())
    for (const auto& d : eval["domains"])
      if (d.is_string()) order.push_back(d.get<std::string>());
  for (const auto& [name, m] : eval["models"].items()) {
    if (!m.is_object() || !m.contains("domains") || !m["domains"].is_object()) continue;
    ModelRouting r;
    r.model = name;
    std::vector<std::string> doms = order;
    for (const auto& [d, _] : m["domains"].items())
      if (std::find(doms.begin(), doms.end(), d) == doms.end()) doms.push_back(d);
    size_t L = 0, E = 0;
    for (const auto& d : doms) {
      if (!m["domains"].contains(d)) continue;
      const json& rt = m["domains"][d].value("routing", json());
      if (!rt.is_array() || rt.empty() || !rt[0].is_array() || rt[0].empty()) continue;
      if (L == 0) L = rt.size(), E = rt[0].size();
      if (rt.size() != L) continue;
      bool ok = true;
      for (const auto& layer : rt) {
        ok = ok && layer.is_array() && layer.size() == E;
        for (size_t e = 0; ok && e < E; ++e) ok = layer[e].is_number();
      }
      if (!ok) continue;
      r.domains.push_back(d);
      if (r.share.empty()) r.share.resize(L);
      for (size_t l = 0; l < L; ++l) {
        std::vector<double> v;
        for (const auto& x : rt[l]) v.push_back(x.get<double>());
        r.share[l].push_back(v);
      }
    }
    if (r.domains.empty()) continue;
    if (m.contains("expert_names") && m["expert_names"].is_array() && m["expert_names"].size() == E)
      for (const auto& n : m["expert_names"]) r.experts.push_back(n.is_string() ? n.get<std::string>() : "?");
    r.named = !r.experts.empty();
    if (r.experts.empty())
      for (size_t e = 0; e < E; ++e) r.experts.push_back("expert " + std::to_string(e));
    if (m.contains("token_specialization")) r.top_k = static_cast<int64_t>(Num(m["token_specialization"], "top_k", 0));
    out.push_back(std::move(r));
  }
  return out;
}

constexpr uint32_t kPalette[] = {0x4e79a7, 0xf28e2b, 0xe15759, 0x76b7b2, 0x59a14f,
                                 0xedc948, 0xb07aa1, 0xff9da7, 0x9c755f, 0xbab0ac};
uint32_t ExpertColor(size_t e) { return kPalette[e % (sizeof kPalette / sizeof kPalette[0])]; }

Shape Text(double x, double y, std::string s, int anchor = 0, bool bold = false, uint32_t rgb = 0x222222) {
  Shape t;
  t.kind = Shape::kText;
  t.x = x, t.y = y, t.text = std::move(s), t.anchor = anchor, t.bold = bold, t.rgb = rgb;
  return t;
}
Shape Line(double x, double y, double w, double h, uint32_t rgb, double stroke = 1, bool dashed = false) {
  Shape l;
  l.kind = Shape::kLine;
  l.x = x, l.y = y, l.w = w, l.h = h, l.rgb = rgb, l.stroke = stroke, l.dashed = dashed;
  return l;
}
Shape Box(double x, double y, double w, double h, uint32_t rgb) {
  Shape r;
  r.x = x, r.y = y, r.w = w, r.h = h, r.rgb = rgb;
  return r;
}

// The smallest of a few round values that leaves every bar and the uniform line inside the panel.
double AxisMax(double v) {
  for (double c : {0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.75, 0.8, 1.0})
    if (v <= c + 1e-12) return c;
  return std::ceil(v * 10) / 10;
}

std::string Percent(double v) {
  std::string s = Fmt("%.1f", 100 * v);
  if (s.size() > 2 && s.compare(s.size() - 2, 2, ".0") == 0) s.resize(s.size() - 2);
  return s + "%";
}

Scene BuildRoutingScene(const std::vector<ModelRouting>& models) {
  Scene sc;
  constexpr double kMargin = 10, kLeft = 36, kRight = 8, kPlotH = 110, kBarW = 8, kGroupGap = 12, kTargetW = 1000;
  // Panel width is the widest any model needs, so that columns line up across models.
  double panel_w = 0;
  for (const auto& m : models) {
    const double E = static_cast<double>(m.experts.size()), D = static_cast<double>(m.domains.size());
    const double plot_w = std::max(120.0, D * (E * kBarW + (E - 1)) + (D + 1) * kGroupGap);
    panel_w = std::max(panel_w, kLeft + plot_w + kRight);
  }
  const double panel_h = 16 + kPlotH + 20;
  size_t cols = 1;
  for (const auto& m : models) cols = std::max(cols, std::min(m.share.size(), static_cast<size_t>(std::max(1.0, std::floor((kTargetW - 2 * kMargin) / panel_w)))));
  double width = 2 * kMargin + static_cast<double>(cols) * panel_w;
  const std::string title = "Routing: share of (token, slot) assignments per expert, by layer and domain";
  width = std::max(width, 2 * kMargin + kCharW * 1.2 * static_cast<double>(title.size()));
  double y = kMargin + 12;
  sc.shapes.push_back(Text(kMargin, y, title, 0, true));
  y += 10;
  for (const auto& m : models) {
    const size_t E = m.experts.size(), D = m.domains.size(), L = m.share.size();
    double top = 0;
    for (const auto& layer : m.share)
      for (const auto& dom : layer)
        for (double v : dom) top = std::max(top, v);
    const double uniform = 1.0 / static_cast<double>(E);
    const double ymax = AxisMax(std::max(top, uniform));
    y += 18;
    std::string head = "model " + m.model + ": " + std::to_string(E) + " experts";
    if (m.top_k > 0) head += ", top-" + std::to_string(m.top_k);
    head += "; dashed line: uniform (" + Percent(uniform) + ")";
    sc.shapes.push_back(Text(kMargin, y, head, 0, true));
    // Legend, wrapped to the chart width.
    y += 8;
    double lx = kMargin;
    for (size_t e = 0; e < E; ++e) {
      const std::string label = m.named ? std::to_string(e) + ": " + m.experts[e] : m.experts[e];
      const double need = 14 + kCharW * static_cast<double>(label.size()) + 14;
      if (lx > kMargin && lx + need > width - kMargin) lx = kMargin, y += 16;
      sc.shapes.push_back(Box(lx, y + 2, 10, 10, ExpertColor(e)));
      sc.shapes.push_back(Text(lx + 14, y + 11, label));
      lx += need;
    }
    y += 18;
    const double plot_w = panel_w - kLeft - kRight;
    const double group_w = static_cast<double>(E) * kBarW + static_cast<double>(E - 1);
    const double gap = (plot_w - static_cast<double>(D) * group_w) / static_cast<double>(D + 1);
    for (size_t l = 0; l < L; ++l) {
      const double px = kMargin + static_cast<double>(l % cols) * panel_w;
      const double py = y + static_cast<double>(l / cols) * panel_h;
      const double left = px + kLeft, ptop = py + 16, bottom = ptop + kPlotH;
      auto ypos = [&](double v) { return bottom - std::min(v, ymax) / ymax * kPlotH; };
      sc.shapes.push_back(Text(left + plot_w / 2, py + 10, "layer " + std::to_string(l), 1, true));
      for (double f : {0.5, 1.0}) {
        sc.shapes.push_back(Line(left, ypos(f * ymax), plot_w, 0, 0xdddddd));
        sc.shapes.push_back(Text(left - 3, ypos(f * ymax) + 3, Percent(f * ymax), 2, false, 0x555555));
      }
      sc.shapes.push_back(Text(left - 3, bottom + 3, "0%", 2, false, 0x555555));
      for (size_t d = 0; d < D; ++d) {
        const double gx = left + gap + static_cast<double>(d) * (group_w + gap);
        for (size_t e = 0; e < E; ++e) {
          const double v = m.share[l][d][e];
          Shape bar = Box(gx + static_cast<double>(e) * (kBarW + 1), ypos(v), kBarW, bottom - ypos(v), ExpertColor(e));
          bar.title = "layer " + std::to_string(l) + ", domain " + m.domains[d] + ", expert " + std::to_string(e) +
                      (m.named ? " (" + m.experts[e] + ")" : "") + ": " + Fmt("%.2f", 100 * v) + "%";
          bar.data = {{"model", m.model}, {"layer", std::to_string(l)}, {"domain", m.domains[d]},
                      {"expert", std::to_string(e)}, {"share", Fmt("%.6f", v)}};
          sc.shapes.push_back(bar);
        }
        std::string label = m.domains[d];
        const size_t fit = static_cast<size_t>(std::max(1.0, std::floor((group_w + gap - 2) / kCharW)));
        if (label.size() > fit) label.resize(fit);
        sc.shapes.push_back(Text(gx + group_w / 2, bottom + 12, label, 1));
      }
      if (uniform <= ymax) sc.shapes.push_back(Line(left, ypos(uniform), plot_w, 0, 0x777777, 1, true));
      sc.shapes.push_back(Line(left, ptop, 0, kPlotH, 0x444444));
      sc.shapes.push_back(Line(left, bottom, plot_w, 0, 0x444444));
    }
    y += static_cast<double>((L + cols - 1) / cols) * panel_h;
  }
  sc.w = std::ceil(width);
  sc.h = std::ceil(y + kMargin);
  return sc;
}

std::string XmlEscape(const std::string& s) {
  std::string o;
  for (char c : s) {
    switch (c) {
      case '&': o += "&amp;"; break;
      case '<': o += "&lt;"; break;
      case '>': o += "&gt;"; break;
      case '"': o += "&quot;"; break;
      case '\'': o += "&apos;"; break;
      default:
        // XML 1.0 forbids most control characters even as references.
        if (static_cast<unsigned char>(c) < 0x20 && c != '\t' && c != '\n') o += ' ';
        else o.push_back(c);
    }
  }
  return o;
}

std::string Hex(uint32_t rgb) {
  char b[8];
  std::snprintf(b, sizeof b, "#%06x", rgb & 0xffffff);
  return b;
}

std::string N(double v) { return Fmt("%.2f", v); }


}  // namespace


std::string RoutingSvg(const json& eval) {
  const auto models = CollectRouting(eval);
  if (models.empty()) return "";
  const Scene sc = BuildRoutingScene(models);
  std::string o = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n";
  o += "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" + N(sc.w) + "\" height=\"" + N(sc.h) + "\" viewBox=\"0 0 " +
       N(sc.w) + " " + N(sc.h) + "\">\n";
  o += "<title>Expert routing per layer and domain</title>\n";
  o += "<desc>For each MoE model and layer, the share of (token, slot) routing assignments that each expert received "
       "on each evaluation domain. Every bar carries its value in data-share.</desc>\n";
  o += "<style>text{font-family:'DejaVu Sans Mono',Menlo,Consolas,monospace;font-size:10px}"
       ".b{font-weight:bold;font-size:12px}</style>\n";
  o += "<rect x=\"0\" y=\"0\" width=\"" + N(sc.w) + "\" height=\"" + N(sc.h) + "\" fill=\"#ffffff\"/>\n";
  for (const Shape& s : sc.shapes) {
    if (s.kind == Shape::kRect) {
      o += "<rect x=\"" + N(s.x) + "\" y=\"" + N(s.y) + "\" width=\"" + N(s.w) + "\" height=\"" + N(s.h) + "\" fill=\"" +
           Hex(s.rgb) + "\"";
      for (const auto& [k, v] : s.data) o += " data-" + k + "=\"" + XmlEscape(v) + "\"";
      if (s.title.empty()) o += "/>\n";
      else o += "><title>" + XmlEscape(s.title) + "</title></rect>\n";
    } else if (s.kind == Shape::kLine) {
      o += "<line x1=\"" + N(s.x) + "\" y1=\"" + N(s.y) + "\" x2=\"" + N(s.x + s.w) + "\" y2=\"" + N(s.y + s.h) +
           "\" stroke=\"" + Hex(s.rgb) + "\" stroke-width=\"" + N(s.stroke) + "\"" +
           (s.dashed ? " stroke-dasharray=\"3,2\"" : "") + "/>\n";
    } else {
      o += "<text x=\"" + N(s.x) + "\" y=\"" + N(s.y) + "\" fill=\"" + Hex(s.rgb) + "\"" +
           (s.anchor == 1 ? " text-anchor=\"middle\"" : s.anchor == 2 ? " text-anchor=\"end\"" : "") +
           (s.bold ? " class=\"b\"" : "") + ">" + XmlEscape(s.text) + "</text>\n";
    }
  }
  o += "</svg>\n";
  return o;
}

std::string RoutingPng(const json& eval) {
  if (!PngAvailable()) return "";
  const auto models = CollectRouting(eval);
  if (models.empty()) return "";
  const Scene sc = BuildRoutingScene(models);
  // Twice the SVG's size, so that the 5x7 glyphs read like 10px text; once for very large charts.
  return RenderPng(sc, sc.w * sc.h * 4 <= 40e6 ? 2 : 1);
}

std::string EvalText(const json& eval) {
  if (!eval.is_object() || !eval.contains("models") || !eval["models"].is_object()) return "";
  std::vector<std::string> domains;
  if (eval.contains("domains") && eval["domains"].is_array())
    for (const auto& d : eval["domains"])
      if (d.is_string()) domains.push_back(d.get<std::string>());
  size_t name_w = 6;
  for (const auto& [name, _] : eval["models"].items()) name_w = std::max(name_w, name.size());
  std::string o = "Validation loss (nats/token)\n" + Pad("model", name_w + 2, false);
  std::vector<size_t> col_w;
  for (const auto& d : domains) {
    col_w.push_back(std::max<size_t>(8, d.size() + 2));
    o += Pad(d, col_w.back(), true);
  }
  o += Pad("avg", 8, true) + "\n";
  for (const auto& [name, m] : eval["models"].items()) {
    o += Pad(name, name_w + 2, false);
    for (size_t i = 0; i < domains.size(); ++i) {
      const json dm = m.is_object() && m.contains("domains") && m["domains"].contains(domains[i]) ? m["domains"][domains[i]] : json();
      const double loss = Num(dm, "loss");
      o += Pad(std::isnan(loss) ? "-" : Fmt("%.3f", loss), col_w[i], true);
    }
    const double avg = Num(m, "avg_loss");
    o += Pad(std::isnan(avg) ? "-" : Fmt("%.3f", avg), 8, true) + "\n";
  }
  for (const auto& r : CollectRouting(eval)) {
    const size_t E = r.experts.size();
    o += "\nRouting of " + r.model + ": share of (token, slot) assignments per expert, % (uniform " +
         Fmt("%.1f", 100.0 / static_cast<double>(E)) + ")\n";
    size_t dom_w = 8;
    for (const auto& d : r.domains) dom_w = std::max(dom_w, d.size() + 2);
    o += Pad("layer", 7, false) + Pad("domain", dom_w, false);
    std::vector<size_t> w;
    for (const auto& n : r.experts) {
      w.push_back(std::max<size_t>(7, n.size() + 2));
      o += Pad(n, w.back(), true);
    }
    o += "\n";
    for (size_t l = 0; l < r.share.size(); ++l)
      for (size_t d = 0; d < r.domains.size(); ++d) {
        o += Pad(std::to_string(l), 7, false) + Pad(r.domains[d], dom_w, false);
        for (size_t e = 0; e < E; ++e) o += Pad(Fmt("%.1f", 100 * r.share[l][d][e]), w[e], true);
        o += "\n";
      }
    const json& m = eval["models"][r.model];
    if (!m.contains("token_specialization") || !m["token_specialization"].is_object()) continue;
    const json& ts = m["token_specialization"];
    o += "\nToken-ID specialization of " + r.model + " (token ids seen >= " + Fmt("%.0f", Num(ts, "min_count", 0)) +
         " times; score: mean share of a token id's occurrences that reach its top expert, weighted by occurrences;"
         " baseline: the same for a router that ignores token ids)\n";
    o += Pad("layer", 7, false) + Pad("score", 8, true) + Pad("baseline", 10, true) + Pad("token ids", 11, true) +
         Pad("tokens", 10, true) + "\n";
    const json& layers = ts.value("layers", json::array());
    for (size_t l = 0; l < layers.size(); ++l)
      o += Pad(std::to_string(l), 7, false) + Pad(Fmt("%.3f", Num(layers[l], "score", 0)), 8, true) +
           Pad(Fmt("%.3f", Num(layers[l], "baseline", 0)), 10, true) +
           Pad(Fmt("%.0f", Num(layers[l], "token_ids", 0)), 11, true) + Pad(Fmt("%.0f", Num(layers[l], "tokens", 0)), 10, true) +
           "\n";
    o += "Top tokens per expert (token share-of-its-occurrences count):\n";
    for (size_t l = 0; l < layers.size(); ++l) {
      if (!layers[l].contains("experts") || !layers[l]["experts"].is_array()) continue;
      for (const auto& x : layers[l]["experts"]) {
        const size_t e = static_cast<size_t>(Num(x, "expert", 0));
        o += "  layer " + std::to_string(l) + " expert " + std::to_string(e) + (e < E && r.named ? " (" + r.experts[e] + ")" : "") +
             ", " + Fmt("%.0f", Num(x, "token_ids", 0)) + " ids:";
        if (x.contains("top") && x["top"].is_array())
          for (const auto& t : x["top"])
            o += " '" + (t.contains("text") && t["text"].is_string() ? t["text"].get<std::string>() : Fmt("%.0f", Num(t, "id", 0))) +
                 "' " + Fmt("%.0f%%", 100 * Num(t, "share", 0)) + " " + Fmt("%.0f", Num(t, "count", 0)) + ",";
        if (o.back() == ',') o.pop_back();
        o += "\n";
      }
    }
  }
  return o;
}

}  // namespace btx::model

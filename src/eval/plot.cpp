// Loss curves from metrics.jsonl drawn with OpenCV (no plotting library needed).
#include <cmath>
#include <cstdio>
#include <sstream>
#include <fstream>
#include <stdexcept>

#include <nlohmann/json.hpp>
#if OMNILITE_HAVE_OPENCV
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>
#endif

#include "omnilite/eval/evaluate.h"
#include "omnilite/files.h"

namespace omnilite {

#if OMNILITE_HAVE_OPENCV
namespace {

using Series = std::vector<cv::Point2d>;

// Rows of metrics.jsonl as (step, value) per key; rows without the key are skipped.
std::vector<Series> read_metrics(const std::string& metrics_jsonl, const std::vector<std::string>& keys) {
  std::ifstream f(metrics_jsonl);
  if (!f) throw std::runtime_error("cannot read \"" + metrics_jsonl + "\"");
  std::vector<Series> series(keys.size());
  std::string line;
  while (std::getline(f, line)) {
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (!j.is_object() || !j.contains("step")) continue;
    for (size_t k = 0; k < keys.size(); ++k)
      if (j.contains(keys[k]) && j[keys[k]].is_number()) series[k].emplace_back(j["step"].get<double>(), j[keys[k]].get<double>());
  }
  return series;
}

// Exponential moving average (weight `beta` on the past), bias-corrected as TensorBoard's smoothing.
Series smoothed(const Series& s, double beta) {
  Series out;
  double m = 0;
  for (size_t i = 0; i < s.size(); ++i) {
    m = beta * m + (1 - beta) * s[i].y;
    out.emplace_back(s[i].x, m / (1 - std::pow(beta, static_cast<double>(i + 1))));
  }
  return out;
}

const cv::Scalar kColors[] = {{0, 0, 0}, {200, 60, 0}, {0, 140, 0}, {0, 0, 220}, {160, 0, 160}, {0, 150, 200}};

// One plot in `area` of `img`: each named series as a line (thin and light when `raw` is given beside it), a
// y axis from min(0, lowest) to the highest value, a legend at the right and a title.
void plot_panel(cv::Mat& img, const cv::Rect& area, const std::string& title, const std::vector<std::string>& names,
                const std::vector<Series>& lines, const std::vector<Series>& raw = {}) {
  double max_x = 1, min_y = 0, max_y = 1e-9;
  bool any = false;
  for (const auto* group : {&lines, &raw})
    for (const auto& s : *group)
      for (const auto& p : s) {
        max_x = std::max(max_x, p.x);
        max_y = std::max(max_y, p.y);
        min_y = std::min(min_y, p.y);
        any = true;
      }
  const int left = area.x + 70, right = area.x + area.width - 170, top = area.y + 28, bottom = area.y + area.height - 40;
  cv::putText(img, title, cv::Point(left, area.y + 18), cv::FONT_HERSHEY_SIMPLEX, 0.5, cv::Scalar(0, 0, 0), 1);
  cv::rectangle(img, cv::Point(left, top), cv::Point(right, bottom), cv::Scalar(0, 0, 0), 1);
  auto to_px = [&](const cv::Point2d& p) {
    return cv::Point(left + static_cast<int>((right - left) * p.x / max_x),
                     bottom - static_cast<int>((bottom - top) * (p.y - min_y) / (max_y - min_y)));
  };
  for (int i = 0; i <= 4; ++i) {
    const double y = min_y + (max_y - min_y) * i / 4.0;
    const auto p = to_px({0, y});
    cv::line(img, p, cv::Point(right, p.y), cv::Scalar(225, 225, 225), 1);
    char buf[32];
    std::snprintf(buf, sizeof buf, std::abs(y) < 0.01 && y != 0 ? "%.1e" : "%.3g", y);
    cv::putText(img, buf, cv::Point(area.x + 4, p.y + 4), cv::FONT_HERSHEY_SIMPLEX, 0.38, cv::Scalar(0, 0, 0), 1);
  }
  char xl[64];
  std::snprintf(xl, sizeof xl, "step (0 .. %.0f)", max_x);
  cv::putText(img, xl, cv::Point((left + right) / 2 - 60, bottom + 28), cv::FONT_HERSHEY_SIMPLEX, 0.45,
              cv::Scalar(0, 0, 0), 1);
  if (!any) cv::putText(img, "no data", cv::Point(left + 20, top + 30), cv::FONT_HERSHEY_SIMPLEX, 0.5, cv::Scalar(0, 0, 200), 1);
  int legend = 0;
  for (size_t k = 0; k < lines.size(); ++k) {
    const auto& c = kColors[k % 6];
    if (k < raw.size()) {
      const cv::Scalar light((c[0] + 2 * 255) / 3, (c[1] + 2 * 255) / 3, (c[2] + 2 * 255) / 3);
      for (size_t i = 1; i < raw[k].size(); ++i) cv::line(img, to_px(raw[k][i - 1]), to_px(raw[k][i]), light, 1, cv::LINE_AA);
    }
    for (size_t i = 1; i < lines[k].size(); ++i)
      cv::line(img, to_px(lines[k][i - 1]), to_px(lines[k][i]), c, 2, cv::LINE_AA);
    if (lines[k].size() == 1) cv::circle(img, to_px(lines[k][0]), 3, c, cv::FILLED);
    if (lines[k].empty()) continue;
    const int y = top + 16 + 20 * legend++;
    cv::line(img, cv::Point(right + 8, y - 4), cv::Point(right + 30, y - 4), c, 2);
    cv::putText(img, names[k], cv::Point(right + 34, y), cv::FONT_HERSHEY_SIMPLEX, 0.4, cv::Scalar(0, 0, 0), 1);
  }
}

void write_png(const cv::Mat& img, const std::string& png) {
  std::vector<uint8_t> bytes;
  if (!cv::imencode(".png", img, bytes)) throw std::runtime_error("cannot encode \"" + png + "\" as PNG");
  AtomicFile f(png);
  f.write(bytes.data(), bytes.size());
  f.commit();
}

}  // namespace

void write_loss_curves(const std::string& metrics_jsonl, const std::vector<std::string>& keys, const std::string& png) {
  const auto raw = read_metrics(metrics_jsonl, keys);
  std::vector<Series> smooth;
  for (const auto& s : raw) smooth.push_back(smoothed(s, 0.9));
  cv::Mat img(540, 960, CV_8UC3, cv::Scalar(255, 255, 255));
  plot_panel(img, cv::Rect(0, 0, 960, 540), "loss terms (thin: raw per step; thick: EMA 0.9)", keys, smooth, raw);
  write_png(img, png);
}

void write_training_stats(const std::string& metrics_jsonl, const std::string& png) {
  const std::vector<std::string> keys = {"lr", "grad_norm", "tokens_per_s"};
  const auto raw = read_metrics(metrics_jsonl, keys);
  cv::Mat img(3 * 300, 960, CV_8UC3, cv::Scalar(255, 255, 255));
  const char* titles[] = {"learning rate", "gradient norm before clipping (thin: raw; thick: EMA 0.9)",
                          "tokens per second (thin: raw; thick: EMA 0.9)"};
  for (int k = 0; k < 3; ++k) {
    const bool smooth = k > 0;
    plot_panel(img, cv::Rect(0, 300 * k, 960, 300), titles[k], {keys[static_cast<size_t>(k)]},
               {smooth ? smoothed(raw[static_cast<size_t>(k)], 0.9) : raw[static_cast<size_t>(k)]},
               smooth ? std::vector<Series>{raw[static_cast<size_t>(k)]} : std::vector<Series>{});
  }
  write_png(img, png);
}

void write_run_comparison(const std::vector<std::string>& metrics_files, const std::vector<std::string>& labels,
                          const std::vector<std::string>& keys, const std::string& png) {
  const int panel_h = 320;
  cv::Mat img(panel_h * static_cast<int>(keys.size()), 960, CV_8UC3, cv::Scalar(255, 255, 255));
  for (size_t k = 0; k < keys.size(); ++k) {
    std::vector<Series> raw, smooth;
    for (const auto& f : metrics_files) {
      raw.push_back(read_metrics(f, {keys[k]})[0]);
      smooth.push_back(smoothed(raw.back(), 0.9));
    }
    plot_panel(img, cv::Rect(0, panel_h * static_cast<int>(k), 960, panel_h), keys[k] + " (thick: EMA 0.9)", labels,
               smooth, raw);
  }
  write_png(img, png);
}

void write_heatmap(const torch::Tensor& values, const std::string& title, const std::string& row_label,
                   const std::string& col_label, const std::string& png) {
  auto v = values.to(torch::kFloat64).cpu();
  const int R = static_cast<int>(v.size(0)), C = static_cast<int>(v.size(1));
  const int cell = std::max(8, std::min(40, 800 / std::max(R, C))), left = 60, top = 40;
  cv::Mat img(top + R * cell + 60, left + C * cell + 120, CV_8UC3, cv::Scalar(255, 255, 255));
  const double lo = v.min().item<double>(), hi = std::max(v.max().item<double>(), lo + 1e-12);
  cv::Mat gray(R, C, CV_8UC1);
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c)
      gray.at<uint8_t>(r, c) = static_cast<uint8_t>(255.0 * (v[r][c].item<double>() - lo) / (hi - lo));
  cv::Mat colored, big;
  cv::applyColorMap(gray, colored, cv::COLORMAP_VIRIDIS);
  cv::resize(colored, big, cv::Size(C * cell, R * cell), 0, 0, cv::INTER_NEAREST);
  big.copyTo(img(cv::Rect(left, top, C * cell, R * cell)));
  cv::putText(img, title, cv::Point(left, 24), cv::FONT_HERSHEY_SIMPLEX, 0.5, cv::Scalar(0, 0, 0), 1);
  cv::putText(img, col_label, cv::Point(left, top + R * cell + 22),
              cv::FONT_HERSHEY_SIMPLEX, 0.45, cv::Scalar(0, 0, 0), 1);
  cv::putText(img, row_label, cv::Point(4, top + 14), cv::FONT_HERSHEY_SIMPLEX, 0.4, cv::Scalar(0, 0, 0), 1);
  for (int r = 0; r < R; r += std::max(1, R / 12))
    cv::putText(img, std::to_string(r), cv::Point(30, top + r * cell + cell / 2 + 4), cv::FONT_HERSHEY_SIMPLEX, 0.35,
                cv::Scalar(0, 0, 0), 1);
  char range[96];
  std::snprintf(range, sizeof range, "dark %.3g .. bright %.3g", lo, hi);
  cv::putText(img, range, cv::Point(left, top + R * cell + 44), cv::FONT_HERSHEY_SIMPLEX, 0.45, cv::Scalar(0, 0, 0), 1);
  write_png(img, png);
}

void write_captioned_grid(const torch::Tensor& images, const std::vector<std::string>& captions, int64_t cols,
                          const std::string& png) {
  const int64_t n = images.size(0), rows = (n + cols - 1) / cols;
  const int scale = 4, side = static_cast<int>(images.size(2)) * scale, cell_w = std::max(side, 200), text_h = 36;
  cv::Mat img(static_cast<int>(rows) * (side + text_h), static_cast<int>(cols) * cell_w, CV_8UC3, cv::Scalar(255, 255, 255));
  auto u8 = ((images.to(torch::kFloat32).cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch::kUInt8);
  for (int64_t i = 0; i < n; ++i) {
    auto im = u8[i].permute({1, 2, 0}).contiguous();  // [H, W, C] RGB or gray
    if (im.size(2) == 1) im = im.repeat({1, 1, 3});
    cv::Mat rgb(static_cast<int>(im.size(0)), static_cast<int>(im.size(1)), CV_8UC3, im.data_ptr<uint8_t>()), bgr, big;
    cv::cvtColor(rgb, bgr, cv::COLOR_RGB2BGR);
    cv::resize(bgr, big, cv::Size(side, side), 0, 0, cv::INTER_NEAREST);
    const int x = static_cast<int>(i % cols) * cell_w, y = static_cast<int>(i / cols) * (side + text_h);
    big.copyTo(img(cv::Rect(x + (cell_w - side) / 2, y, side, side)));
    const std::string& cap = i < static_cast<int64_t>(captions.size()) ? captions[static_cast<size_t>(i)] : "";
    // Word-wrapped to the cell's width, at most two lines (a longer caption ends in "...").
    std::vector<std::string> lines(1);
    std::stringstream words(i < static_cast<int64_t>(captions.size()) ? captions[static_cast<size_t>(i)] : "");
    std::string w;
    auto width = [](const std::string& t) {
      int base = 0;
      return cv::getTextSize(t, cv::FONT_HERSHEY_SIMPLEX, 0.4, 1, &base).width;
    };
    while (words >> w) {
      const std::string next = lines.back().empty() ? w : lines.back() + " " + w;
      if (width(next) <= cell_w - 8 || lines.back().empty()) lines.back() = next;
      else lines.push_back(w);
    }
    if (lines.size() > 2) lines.resize(2), lines[1] += " ...";
    for (size_t l = 0; l < lines.size(); ++l)
      cv::putText(img, lines[l], cv::Point(x + 4, y + side + 14 + 16 * static_cast<int>(l)), cv::FONT_HERSHEY_SIMPLEX,
                  0.4, cv::Scalar(0, 0, 0), 1);
  }
  write_png(img, png);
}

#else  // a build without OpenCV draws nothing; evaluate() checks have_opencv() and skips the reports

namespace {
[[noreturn]] void no_opencv(const std::string& png) {
  throw std::runtime_error("cannot draw \"" + png + "\": this build has no OpenCV (OMNILITE_WITH_OPENCV=OFF)");
}
}  // namespace

void write_loss_curves(const std::string&, const std::vector<std::string>&, const std::string& png) { no_opencv(png); }
void write_training_stats(const std::string&, const std::string& png) { no_opencv(png); }
void write_run_comparison(const std::vector<std::string>&, const std::vector<std::string>&,
                          const std::vector<std::string>&, const std::string& png) {
  no_opencv(png);
}
void write_heatmap(const torch::Tensor&, const std::string&, const std::string&, const std::string&,
                   const std::string& png) {
  no_opencv(png);
}
void write_captioned_grid(const torch::Tensor&, const std::vector<std::string>&, int64_t, const std::string& png) {
  no_opencv(png);
}
#endif

}  // namespace omnilite

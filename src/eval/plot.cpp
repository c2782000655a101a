// Loss curves from metrics.jsonl drawn with OpenCV (no plotting library needed).
#include <filesystem>
#include <fstream>
#include <stdexcept>

#include <nlohmann/json.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include "omnilite/eval/evaluate.h"

namespace omnilite {

void write_loss_curves(const std::string& metrics_jsonl, const std::vector<std::string>& keys, const std::string& png) {
  std::ifstream f(metrics_jsonl);
  if (!f) throw std::runtime_error("cannot read \"" + metrics_jsonl + "\"");
  std::vector<std::vector<cv::Point2d>> series(keys.size());
  std::string line;
  double max_step = 1, max_y = 1e-9;
  while (std::getline(f, line)) {
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (!j.is_object() || !j.contains("step")) continue;
    const double step = j["step"].get<double>();
    max_step = std::max(max_step, step);
    for (size_t k = 0; k < keys.size(); ++k)
      if (j.contains(keys[k]) && j[keys[k]].is_number()) {
        const double y = j[keys[k]].get<double>();
        series[k].emplace_back(step, y);
        max_y = std::max(max_y, y);
      }
  }
  const int W = 960, H = 540, left = 70, right = 200, top = 30, bottom = 50;
  cv::Mat img(H, W, CV_8UC3, cv::Scalar(255, 255, 255));
  auto to_px = [&](const cv::Point2d& p) {
    return cv::Point(left + static_cast<int>((W - left - right) * p.x / max_step),
                     H - bottom - static_cast<int>((H - top - bottom) * p.y / max_y));
  };
  cv::rectangle(img, cv::Point(left, top), cv::Point(W - right, H - bottom), cv::Scalar(0, 0, 0), 1);
  for (int i = 0; i <= 4; ++i) {  // y grid and labels
    const double y = max_y * i / 4.0;
    const auto p = to_px({0, y});
    cv::line(img, p, cv::Point(W - right, p.y), cv::Scalar(225, 225, 225), 1);
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.2f", y);
    cv::putText(img, buf, cv::Point(8, p.y + 4), cv::FONT_HERSHEY_SIMPLEX, 0.4, cv::Scalar(0, 0, 0), 1);
  }
  char xl[64];
  std::snprintf(xl, sizeof xl, "step (0 .. %.0f)", max_step);
  cv::putText(img, xl, cv::Point(W / 2 - 80, H - 15), cv::FONT_HERSHEY_SIMPLEX, 0.5, cv::Scalar(0, 0, 0), 1);
  const cv::Scalar colors[] = {{0, 0, 0}, {200, 60, 0}, {0, 140, 0}, {0, 0, 220}, {160, 0, 160}, {0, 150, 200}};
  int legend = 0;
  for (size_t k = 0; k < keys.size(); ++k) {
    if (series[k].empty()) continue;
    const auto& c = colors[k % 6];
    for (size_t i = 1; i < series[k].size(); ++i)
      cv::line(img, to_px(series[k][i - 1]), to_px(series[k][i]), c, 1, cv::LINE_AA);
    if (series[k].size() == 1) cv::circle(img, to_px(series[k][0]), 3, c, cv::FILLED);
    const int y = top + 20 + 22 * legend++;
    cv::line(img, cv::Point(W - right + 10, y - 4), cv::Point(W - right + 35, y - 4), c, 2);
    cv::putText(img, keys[k], cv::Point(W - right + 40, y), cv::FONT_HERSHEY_SIMPLEX, 0.45, cv::Scalar(0, 0, 0), 1);
  }
  const std::string tmp = png + ".tmp.png";
  if (!cv::imwrite(tmp, img)) throw std::runtime_error("cannot write \"" + tmp + "\"");
  std::filesystem::rename(tmp, png);
}

}  // namespace omnilite

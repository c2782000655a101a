#include "omnilite/io/spm_model.h"

#include <algorithm>
#include <cstdio>
#include <functional>
#include <cstring>
#include <fstream>
#include <map>
#include <queue>
#include <sstream>
#include <stdexcept>
#include <unordered_map>

#include "omnilite/io/checkpoint.h"

namespace omnilite::io {

namespace {

// Protocol-buffer wire format: varint keys (field << 3 | wire type), varints, fixed 32/64-bit and length-delimited
// fields. Unknown fields are skipped.
struct Wire {
  const uint8_t* p;
  size_t n, pos = 0;
  const std::string& path;
  [[noreturn]] void bad() const {
    throw std::runtime_error("tokenizer \"" + path + "\" is not a SentencePiece model (malformed protobuf at byte " +
                             std::to_string(pos) + "); hint: pass the .model file SentencePiece wrote");
  }
  uint64_t varint() {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (pos >= n) bad();
      const uint8_t b = p[pos++];
      v |= static_cast<uint64_t>(b & 0x7f) << shift;
      if (!(b & 0x80)) return v;
    }
    bad();
  }
  Wire sub() {
    const uint64_t len = varint();
    if (len > n - pos) bad();
    Wire w{p + pos, static_cast<size_t>(len), 0, path};
    pos += len;
    return w;
  }
  std::string bytes() {
    Wire w = sub();
    return std::string(reinterpret_cast<const char*>(w.p), w.n);
  }
  float f32() {
    if (n - pos < 4) bad();
    float f;
    std::memcpy(&f, p + pos, 4);
    pos += 4;
    return f;
  }
  void skip(int wire_type) {
    switch (wire_type) {
      case 0: varint(); break;
      case 1: if (n - pos < 8) bad(); pos += 8; break;
      case 2: sub(); break;
      case 5: if (n - pos < 4) bad(); pos += 4; break;
      default: bad();
    }
  }
  bool done() const { return pos >= n; }
};

struct Writer {
  std::string out;
  void varint(uint64_t v) {
    while (v >= 0x80) {
      out.push_back(static_cast<char>((v & 0x7f) | 0x80));
      v >>= 7;
    }
    out.push_back(static_cast<char>(v));
  }
  void key(int field, int wire) { varint(static_cast<uint64_t>(field) << 3 | wire); }
  void u(int field, uint64_t v) {
    key(field, 0);
    varint(v);
  }
  void s(int field, const std::string& v) {
    key(field, 2);
    varint(v.size());
    out += v;
  }
  void f(int field, float v) {
    key(field, 5);
    char b[4];
    std::memcpy(b, &v, 4);
    out.append(b, 4);
  }
};

const std::string kSpace = "\xe2\x96\x81";  // U+2581, SentencePiece's visible space

size_t utf8_len(char c) {
  static const size_t lookup[] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4};
  return lookup[static_cast<uint8_t>(c) >> 4];
}

}  // namespace

SpmModel read_spm_model(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("tokenizer \"" + path + "\" does not exist or cannot be read");
  std::stringstream ss;
  ss << f.rdbuf();
  const std::string data = ss.str();
  SpmModel m;
  Wire w{reinterpret_cast<const uint8_t*>(data.data()), data.size(), 0, path};
  while (!w.done()) {
    const uint64_t k = w.varint();
    const int field = static_cast<int>(k >> 3), wt = static_cast<int>(k & 7);
    if (field == 1 && wt == 2) {  // SentencePiece
      Wire p = w.sub();
      SpmPiece piece;
      while (!p.done()) {
        const uint64_t pk = p.varint();
        const int pf = static_cast<int>(pk >> 3), pw = static_cast<int>(pk & 7);
        if (pf == 1 && pw == 2) piece.piece = p.bytes();
        else if (pf == 2 && pw == 5) piece.score = p.f32();
        else if (pf == 3 && pw == 0) piece.type = static_cast<SpmPieceType>(p.varint());
        else p.skip(pw);
      }
      m.pieces.push_back(std::move(piece));
    } else if ((field == 2 || field == 3) && wt == 2) {  // TrainerSpec, NormalizerSpec
      Wire s = w.sub();
      while (!s.done()) {
        const uint64_t sk = s.varint();
        const int sf = static_cast<int>(sk >> 3), sw = static_cast<int>(sk & 7);
        if (field == 2 && sw == 0 && (sf == 3 || sf == 22 || sf == 25 || sf == 26 || sf == 35)) {
          const uint64_t v = s.varint();
          if (sf == 3) m.model_type = static_cast<int>(v);
          if (sf == 22) m.split_by_whitespace = v != 0;
          if (sf == 25) m.split_digits = v != 0;
          if (sf == 26) m.allow_whitespace_only_pieces = v != 0;
          if (sf == 35) m.byte_fallback = v != 0;
        } else if (field == 3 && sf == 1 && sw == 2) {
          m.normalizer = s.bytes();
        } else if (field == 3 && sf == 2 && sw == 2) {
          m.has_charsmap = !s.bytes().empty();
        } else if (field == 3 && sw == 0 && sf >= 3 && sf <= 5) {
          const bool v = s.varint() != 0;
          (sf == 3 ? m.add_dummy_prefix : sf == 4 ? m.remove_extra_whitespaces : m.escape_whitespaces) = v;
        } else {
          s.skip(sw);
        }
      }
    } else {
      w.skip(wt);
    }
  }
  if (m.pieces.empty()) w.bad();
  return m;
}

namespace {
// The ModelProto.pieces entries of `pieces` (field 1: piece, score, type).
void write_pieces(Writer& out, const std::vector<SpmPiece>& pieces) {
  for (const auto& p : pieces) {
    Writer piece;
    piece.s(1, p.piece);
    piece.f(2, p.score);
    piece.u(3, static_cast<uint64_t>(p.type));
    out.s(1, piece.out);
  }
}

}  // namespace

void append_spm_pieces(const std::string& in, const std::vector<SpmPiece>& pieces, const std::string& out) {
  read_spm_model(in);  // a ModelProto with pieces, or the error that names the file
  std::ifstream f(in, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  Writer extra;
  write_pieces(extra, pieces);
  write_file_atomically(out, ss.str() + extra.out);
}

void write_spm_model(const SpmModel& m, const std::string& path) {
  Writer out;
  write_pieces(out, m.pieces);
  Writer trainer;
  trainer.u(3, static_cast<uint64_t>(m.model_type));
  trainer.u(4, m.pieces.size());
  trainer.u(22, m.split_by_whitespace);
  trainer.u(25, m.split_digits);
  trainer.u(26, m.allow_whitespace_only_pieces);
  trainer.u(35, m.byte_fallback);
  out.s(2, trainer.out);
  Writer norm;
  norm.s(1, m.normalizer);
  norm.u(3, m.add_dummy_prefix);
  norm.u(4, m.remove_extra_whitespaces);
  norm.u(5, m.escape_whitespaces);
  out.s(3, norm.out);
  write_file_atomically(path, out.out);
}

LlamaSpmTokenizer::LlamaSpmTokenizer(SpmModel m) : m_(std::move(m)) {
  for (size_t i = 0; i < m_.pieces.size(); ++i) id_of_.emplace(m_.pieces[i].piece, static_cast<int64_t>(i));
}

std::vector<int64_t> LlamaSpmTokenizer::encode(const std::string& raw) const {
  const SpmModel& m = m_;
  const auto& id_of = id_of_;
  std::vector<int64_t> out;
  if (raw.empty()) return out;
  std::string text;
  for (char c : (m.add_dummy_prefix ? " " : "") + raw) {
    if (c == ' ') text += kSpace;
    else text += c;
  }
  struct Sym {
    size_t off, n;
    int prev, next;
  };
  std::vector<Sym> sym;
  for (size_t off = 0; off < text.size();) {
    const size_t n = std::min(utf8_len(text[off]), text.size() - off);
    sym.push_back({off, n, static_cast<int>(sym.size()) - 1, off + n == text.size() ? -1 : static_cast<int>(sym.size()) + 1});
    off += n;
  }
  struct Bigram {
    int left, right;
    float score;
    size_t size;
  };
  auto lower = [](const Bigram& l, const Bigram& r) { return l.score < r.score || (l.score == r.score && l.left > r.left); };
  std::priority_queue<Bigram, std::vector<Bigram>, decltype(lower)> queue(lower);
  std::map<std::string, std::pair<int, int>> rev_merge;
  auto try_add = [&](int l, int r) {
    if (l < 0 || r < 0) return;
    const std::string t = text.substr(sym[l].off, sym[l].n + sym[r].n);
    const auto it = id_of.find(t);
    if (it == id_of.end()) return;
    queue.push({l, r, m.pieces[it->second].score, t.size()});
    rev_merge[t] = {l, r};
  };
  for (int i = 1; i < static_cast<int>(sym.size()); ++i) try_add(i - 1, i);
  while (!queue.empty()) {
    const Bigram b = queue.top();
    queue.pop();
    auto &l = sym[b.left], &r = sym[b.right];
    if (l.n == 0 || r.n == 0 || l.n + r.n != b.size) continue;
    l.n += r.n;
    r.n = 0;
    l.next = r.next;
    if (r.next >= 0) sym[r.next].prev = b.left;
    try_add(l.prev, b.left);
    try_add(b.left, l.next);
  }
  auto byte_token = [&](uint8_t c) -> int64_t {
    char buf[8];
    std::snprintf(buf, sizeof buf, "<0x%02X>", c);
    auto it = id_of.find(buf);
    if (it == id_of.end()) it = id_of.find(std::string(1, static_cast<char>(c)));
    if (it == id_of.end())
      throw std::runtime_error(std::string("tokenizer: no piece ") + buf + " for a byte llama.cpp must fall back to");
    return it->second;
  };
  std::function<void(const Sym&)> resegment = [&](const Sym& s) {
    const std::string t = text.substr(s.off, s.n);
    const auto it = id_of.find(t);
    if (it != id_of.end()) {
      out.push_back(it->second);
      return;
    }
    const auto p = rev_merge.find(t);
    if (p == rev_merge.end()) {
      for (char c : t) out.push_back(byte_token(static_cast<uint8_t>(c)));
      return;
    }
    resegment(sym[p->second.first]);
    resegment(sym[p->second.second]);
  };
  for (int i = 0; i != -1; i = sym[i].next) resegment(sym[i]);
  return out;
}

}  // namespace omnilite::io

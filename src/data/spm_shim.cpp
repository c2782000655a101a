// A C interface over SentencePiece, built as its own shared object and loaded with dlopen(RTLD_LOCAL |
// RTLD_DEEPBIND).
//
// Why: Debian's libsentencepiece embeds and exports its own copy of protobuf-lite, while LibTorch loads the full
// libprotobuf. Linked into one program, the dynamic linker resolves libprotobuf's internal calls to
// SentencePiece's copy and the program crashes before main (in DescriptorPool::InternalAddGeneratedFile). Loaded
// locally and deep-bound, SentencePiece keeps its protobuf to itself.
#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#if !OMNILITE_SPM_DECLARES_SET_MIN_LOG_LEVEL
// Exported by libsentencepiece 0.1.9x (and 0.2) but not declared; 0.2 declares sentencepiece::SetMinLogLevel, which
// later releases keep alone (CMake checks which one the header has).
namespace sentencepiece::logging {
void SetMinLogLevel(int v);
}
#endif

namespace {

void set_error(char* err, size_t len, const std::string& msg) {
  if (err && len) {
    std::strncpy(err, msg.c_str(), len - 1);
    err[len - 1] = '\0';
  }
}

}  // namespace

extern "C" {

void* omnilite_spm_load(const char* path, char* err, size_t errlen) {
  // No exception may cross this C interface, and the processor must not leak when loading throws (the
  // sanitizer run found it: protobuf throws from inside Load when bound to another protobuf's runtime).
  try {
    auto sp = std::make_unique<sentencepiece::SentencePieceProcessor>();
    const auto status = sp->Load(path);
    if (!status.ok()) {
      set_error(err, errlen, status.ToString());
      return nullptr;
    }
    return sp.release();
  } catch (const std::exception& e) {
    set_error(err, errlen, e.what());
    return nullptr;
  }
}

void omnilite_spm_free(void* h) { delete static_cast<sentencepiece::SentencePieceProcessor*>(h); }

// On success *ids is malloc'ed (free with omnilite_spm_free_buffer) and 0 is returned.
int omnilite_spm_encode(void* h, const char* text, size_t len, int** ids, size_t* n, char* err, size_t errlen) {
  std::vector<int> out;
  const auto status = static_cast<sentencepiece::SentencePieceProcessor*>(h)->Encode(std::string(text, len), &out);
  if (!status.ok()) {
    set_error(err, errlen, status.ToString());
    return 1;
  }
  *n = out.size();
  *ids = static_cast<int*>(std::malloc(std::max<size_t>(1, out.size()) * sizeof(int)));
  if (!out.empty()) std::memcpy(*ids, out.data(), out.size() * sizeof(int));
  return 0;
}

// On success *text is malloc'ed and NUL-terminated, *len its length.
int omnilite_spm_decode(void* h, const int* ids, size_t n, char** text, size_t* len, char* err, size_t errlen) {
  std::string out;
  const auto status =
      static_cast<sentencepiece::SentencePieceProcessor*>(h)->Decode(std::vector<int>(ids, ids + n), &out);
  if (!status.ok()) {
    set_error(err, errlen, status.ToString());
    return 1;
  }
  *len = out.size();
  *text = static_cast<char*>(std::malloc(out.size() + 1));
  std::memcpy(*text, out.c_str(), out.size() + 1);
  return 0;
}

void omnilite_spm_free_buffer(void* p) { std::free(p); }

int omnilite_spm_piece_size(void* h) { return static_cast<sentencepiece::SentencePieceProcessor*>(h)->GetPieceSize(); }

// Id of `piece`, or -1 when the model lacks it.
int omnilite_spm_piece_to_id(void* h, const char* piece) {
  auto* sp = static_cast<sentencepiece::SentencePieceProcessor*>(h);
  const int id = sp->PieceToId(piece);
  return (id == sp->unk_id() && sp->IdToPiece(id) != piece) ? -1 : id;
}

int omnilite_spm_train(const char* args, unsigned seed, char* err, size_t errlen) {
  sentencepiece::SetRandomGeneratorSeed(seed);
  // Errors only (the --minloglevel flag acts after Train's first INFO line). Besides the quiet, this keeps a
  // deep-bound SentencePiece off std::cerr: in a program with a copy-relocated std::cerr (one linked with a non-PIC
  // static library, such as Catch2 v3's libCatch2.a) the deep-bound libstdc++'s own std::cerr is never constructed.
#if OMNILITE_SPM_DECLARES_SET_MIN_LOG_LEVEL
  sentencepiece::SetMinLogLevel(2);
#else
  sentencepiece::logging::SetMinLogLevel(2);
#endif
  const auto status = sentencepiece::SentencePieceTrainer::Train(args);
  if (!status.ok()) {
    set_error(err, errlen, status.ToString());
    return 1;
  }
  return 0;
}

}  // extern "C"

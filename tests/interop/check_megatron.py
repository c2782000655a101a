"""Megatron-LM's own indexed dataset (megatron-core's IndexedDataset and IndexedDatasetBuilder) and OMNI-LITE's token
shards, both ways:
  1. `omnilite data tokenize` of the embedded held-out text, read by Megatron's IndexedDataset: one sequence per
     document, each equal to [BOS] + SentencePiece's (the PyPI library's) ids of the document + [EOS], the document
     boundaries 0..S, dtype uint16.
  2. A shard Megatron's builder writes (int32 tokens, documents of several sequences), read by `omnilite data
     inspect`: the same document count and the same token stream.
"""
import shutil

import numpy as np
import sentencepiece as spm
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from common import FIX, ROOT, finish, omnilite, report

TOKENIZER = ROOT / "data/generated/tokenizer.model"
TEXT = ROOT / "data/generated/text/valid.txt"


def documents(path):
    """The documents of a fortune-format file, as omnilite reads them ('%' lines end a document)."""
    out, doc = [], []
    for line in path.read_text(encoding="utf-8").split("\n"):
        if line == "%":
            out.append("\n".join(doc))
            doc = []
        else:
            doc.append(line)
    out.append("\n".join(doc))
    return [d for d in out if d.strip()]


def ours_read_by_megatron():
    out = FIX / "megatron" / "ours"
    shutil.rmtree(out, ignore_errors=True)
    omnilite("data", "tokenize", "--input", TEXT, "--out", out, "--tokenizer", TOKENIZER, "--shard-tokens", 20000)
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER))
    docs = documents(TEXT)
    prefixes = sorted(p.with_suffix("") for p in out.glob("*.idx"))
    seqs, bounds_ok, dtype_ok = [], True, True
    for prefix in prefixes:
        ds = IndexedDataset(str(prefix))
        bounds_ok &= np.array_equal(ds.document_indices, np.arange(len(ds) + 1))
        dtype_ok &= ds.index.dtype == np.uint16
        seqs += [ds[i].tolist() for i in range(len(ds))]
    want = [[1] + sp.encode(d) + [2] for d in docs]
    differ = sum(a != b for a, b in zip(seqs, want)) + abs(len(seqs) - len(want))
    report(f"Megatron IndexedDataset reads omnilite's {len(prefixes)} shards: sequences that differ from [BOS] + "
           f"sentencepiece.encode(doc) + [EOS], of {len(want)} documents", differ, 0, differ == 0)
    report("Megatron IndexedDataset: document boundaries 0..S and dtype uint16 in every shard",
           int(not (bounds_ok and dtype_ok)), 0, bounds_ok and dtype_ok)


def megatron_read_by_ours():
    out = FIX / "megatron" / "theirs"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(str(out / "m.bin"), dtype=np.int32)
    stream, n_docs = [], 0
    for _ in range(50):
        for _ in range(int(rng.integers(1, 4))):  # a document of 1-3 sequences (Megatron's sentence split)
            seq = rng.integers(7, 4096, size=int(rng.integers(1, 30))).tolist()
            builder.add_item(torch.tensor(seq, dtype=torch.int32))
            stream += seq
        builder.end_document()
        n_docs += 1
    builder.finalize(str(out / "m.idx"))
    info = omnilite("data", "inspect", "--input", out, "--tokenizer", TOKENIZER, "--tokens", f"0:{len(stream)}",
                    json_out=True)
    ok = info["documents"] == n_docs and info["tokens"] == len(stream) and info["ids"] == stream
    report(f"omnilite data inspect reads a Megatron-built int32 shard ({n_docs} documents, {len(stream)} tokens): "
           "documents, tokens and ids equal", int(not ok), 0, ok)


ours_read_by_megatron()
megatron_read_by_ours()
finish()

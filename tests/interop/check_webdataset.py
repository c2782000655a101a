"""WebDataset (the PyPI library) and OMNI-LITE's image-caption tar shards, both ways:
  1. `omnilite data webdataset` of the embedded held-out Fashion-MNIST (t10k), read by webdataset.WebDataset with its
     own decoders: every sample, in order, with the IDX file's pixels (read here with numpy), its label as .cls
     and in the .json, and the caption "a photo of a <class>." as .txt.
  2. Shards webdataset.ShardWriter writes (PNG images, .txt captions, .cls labels), read by `omnilite data inspect`:
     the same sample count, captions, labels and mean pixel values.
"""
import gzip
import shutil

import numpy as np
import webdataset as wds

from common import FIX, ROOT, finish, omnilite, report

IDX = ROOT / "data/generated/fashion-mnist/t10k"
CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]


def read_idx(path):
    """An IDX file (big-endian: 2 zero bytes, dtype 0x08 = uint8, rank, dims) as a numpy array."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    assert raw[0] == 0 and raw[1] == 0 and raw[2] == 8, f"{path}: not a uint8 IDX file"
    rank = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(rank)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * rank).reshape(dims)


def ours_read_by_webdataset():
    out = FIX / "webdataset" / "ours"
    shutil.rmtree(out, ignore_errors=True)
    omnilite("data", "webdataset", "--input", IDX, "--out", out, "--shard-samples", 4000)
    images = read_idx(IDX.parent / "t10k-images-idx3-ubyte")
    labels = read_idx(IDX.parent / "t10k-labels-idx1-ubyte")
    urls = sorted(str(p) for p in out.glob("*.tar"))
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("rgb8")
    n, pixels_differ, labels_differ, captions_differ = 0, 0, 0, 0
    for i, s in enumerate(ds):
        n += 1
        img = s["png"]  # HxWx3 uint8, decoded by webdataset (PIL)
        pixels_differ += int(img.shape != (28, 28, 3) or not np.array_equal(img, np.repeat(images[i][:, :, None], 3, 2)))
        labels_differ += int(s["cls"] != labels[i] or s["json"]["label"] != labels[i])
        want = f"a photo of a {CLASSES[labels[i]]}."
        captions_differ += int(s["txt"] != want or s["json"]["captions"][0] != want)
    report(f"webdataset.WebDataset reads omnilite's {len(urls)} shards: samples (of {len(labels)})", n, len(labels),
           n == len(labels))
    report("webdataset.WebDataset: samples whose PNG differs from the IDX pixels, whose .cls/.json label or whose "
           ".txt/.json caption differs", pixels_differ + labels_differ + captions_differ, 0,
           pixels_differ + labels_differ + captions_differ == 0)


def webdataset_read_by_ours():
    out = FIX / "webdataset" / "theirs"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    want = []
    with wds.ShardWriter(str(out / "w-%06d.tar"), maxcount=128, verbose=0) as sink:
        for i in range(300):
            img = rng.integers(0, 256, size=(20, 20, 3), dtype=np.uint8)
            caption, label = f"sample {i} of {int(rng.integers(0, 1000))}", int(rng.integers(0, 10))
            sink.write({"__key__": f"s{i:06d}", "png": img, "txt": caption, "cls": label})
            want.append((caption, label, float(img.astype(np.float64).mean())))
    info = omnilite("data", "inspect", "--input", out, "--size", 20, "--samples", "0:300", json_out=True)
    got = [(s["captions"][0], s["label"], s["mean"]) for s in info["sample_list"]]
    worst = max(abs(a[2] - b[2]) for a, b in zip(got, want)) if len(got) == len(want) else float("inf")
    same = len(got) == len(want) and all(a[:2] == b[:2] for a, b in zip(got, want))
    report(f"omnilite data inspect reads webdataset.ShardWriter's {info['shards']} shards: samples (of 300), none "
           "skipped or replaced", info["samples"] + info["skipped"] + info["replaced"], 300,
           info["samples"] == 300 and info["skipped"] == 0 and info["replaced"] == 0)
    report("omnilite data inspect of ShardWriter's shards: captions and labels equal, max |mean pixel difference|",
           worst if same else "captions/labels differ", 0.0, same and worst == 0.0)


ours_read_by_webdataset()
webdataset_read_by_ours()
finish()

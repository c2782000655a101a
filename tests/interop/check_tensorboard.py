"""TensorBoard reads `omnilite train`'s event files (RUN/tb/): every record's framing and masked CRC-32C checks out
with TensorBoard's own CRC, and its EventAccumulator returns exactly the scalars of metrics.jsonl (as float32), also
after a resume from an earlier checkpoint, whose abandoned steps TensorBoard must drop."""
import json
import math
import shutil
import struct
from pathlib import Path

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

from common import FIX, finish, omnilite, report


def records_ok(path):
    """(records, bad): TFRecord framing with masked CRC-32C of the length and of the data."""
    data, pos, n, bad = path.read_bytes(), 0, 0, 0
    while pos < len(data):
        (length,) = struct.unpack_from("<Q", data, pos)
        (len_crc,) = struct.unpack_from("<I", data, pos + 8)
        payload = data[pos + 12: pos + 12 + length]
        (data_crc,) = struct.unpack_from("<I", data, pos + 12 + length)
        bad += (masked_crc32c(data[pos: pos + 8]) != len_crc) + (masked_crc32c(payload) != data_crc)
        pos += 16 + length
        n += 1
    return n, bad + (pos != len(data))


def main():
    run = FIX / "tb-run"
    shutil.rmtree(run, ignore_errors=True)
    cfg = json.loads((FIX / "small-untied.json").read_text())
    cfg["data"].update({"image_train": [], "image_valid": []})
    cfg["train"].update({"caption_batch_size": 0, "gen_batch_size": 0})
    cfg["train"].update({"steps": 8, "batch_size": 2, "seq_len": 32, "log_every": 1, "valid_every": 4,
                         "ckpt_every": 4, "warmup_steps": 2})
    cfg_path = FIX / "tb-run.json"
    cfg_path.write_text(json.dumps(cfg))
    omnilite("train", "--config", cfg_path, "--out", run, "--max-steps", 6)
    # As if the run had died after step 6 with its last good checkpoint at step 4: resume from that one.
    omnilite("train", "--config", cfg_path, "--out", run, "--resume", run / "checkpoints/step_0000004")
    files = sorted((run / "tb").glob("events.out.tfevents.*"))
    total = bad = 0
    for f in files:
        n, b = records_ok(f)
        total, bad = total + n, bad + b
    report(f"tensorboard: TFRecord framing and masked CRC-32C, bad records of {total} in {len(files)} files", bad, 0,
           bad == 0 and len(files) == 2)
    ea = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    ea.Reload()
    want = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        for k, v in m.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                want.setdefault(k, {})[m["step"]] = float(np.float32(v))
            elif isinstance(v, bool):
                want.setdefault(k, {})[m["step"]] = float(v)
    tags = set(ea.Tags()["scalars"])
    events = {k: [(e.step, e.value) for e in ea.Scalars(k)] for k in tags}
    got = {k: dict(v) for k, v in events.items()}
    compared = sum(len(v) for v in want.values())
    wrong = sum(got.get(k, {}).get(s) != v for k, vs in want.items() for s, v in vs.items())
    # without the resume's SessionLog START, steps 5 and 6 would be there twice (the abandoned and the new values)
    extra = sum(len(v) - len(set(s for s, _ in v)) + len(set(got[k]) - set(want.get(k, {}))) for k, v in events.items())
    report(f"tensorboard: EventAccumulator scalars != metrics.jsonl (of {compared}; steps 1-8, resumed at 4)", wrong,
           0, wrong == 0 and compared > 0)
    report("tensorboard: scalar events beyond metrics.jsonl's, duplicates included (abandoned steps 5-6 dropped)", extra, 0,
           extra == 0)
    # eval of the run: its numbers and PNG reports go to the same tb/ folder at the checkpoint's step.
    result = json.loads(omnilite("eval", "--checkpoint", run, "--tasks", "ppl,moe", "--json"))  # stdout: JSON alone
    ea = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    pngs = {k: v for k, v in result.items() if isinstance(v, str) and v.endswith(".png")}
    images = set(ea.Tags()["images"])
    bad = 0
    for key, path in pngs.items():
        tag = "eval/" + Path(path).stem
        if tag not in images:
            bad += 1
            continue
        ev = ea.Images(tag)[-1]
        data = Path(path).read_bytes()
        w, h = struct.unpack(">II", data[16:24])
        bad += ev.encoded_image_string != data or ev.width != w or ev.height != h or ev.step != result["step"]
    report(f"tensorboard: eval's PNG reports ({len(pngs)}) as images, missing or different", bad, 0,
           bad == 0 and len(pngs) >= 2)
    got = {e.step: e.value for e in ea.Scalars("eval/text_ppl")} if "eval/text_ppl" in ea.Tags()["scalars"] else {}
    want = float(np.float32(result["text_ppl"]))
    report("tensorboard: eval/text_ppl at the checkpoint's step != eval.json's", abs(got.get(result["step"], -1) - want),
           0.0, got.get(result["step"]) == want)
    finish()


if __name__ == "__main__":
    main()

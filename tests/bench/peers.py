"""Peers for `tests/bench/run.sh`: all-MiniLM-L6-v2 (BERT, mean pooling, L2 normalisation, as
models/minilm.vlm) with PyTorch eager and ONNX Runtime on the same weights, 2 threads.

    python tests/bench/peers.py WEIGHTS_DIR B T RUNS

Inputs are the synthetic ones of `vlmc bench`: token ids 1 + (i*7919) % 999, masks of ones,
token types of zeros. Prints one `key=value` line per peer (median over RUNS after warm-up).
"""

import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from transformers import AutoModel

THREADS = 2


def inputs(b, t):
    n = b * t
    ids = np.array([1 + (i * 7919) % 999 for i in range(n)], dtype=np.int64).reshape(b, t)
    return ids, np.ones((b, t), np.int64), np.zeros((b, t), np.int64)


class Encoder(torch.nn.Module):
    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, ids, mask, types):
        h = self.bert(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=1)


def timed(f, runs):
    f()
    f()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        f()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main():
    wdir, b, t, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(THREADS)
    model = Encoder(AutoModel.from_pretrained(wdir, attn_implementation="eager")).eval()
    ids, mask, types = inputs(b, t)
    tids, tmask, ttypes = (torch.from_numpy(x) for x in (ids, mask, types))
    with torch.inference_mode():
        ms = timed(lambda: model(tids, tmask, ttypes), runs)
    print(f"pytorch size=B={b},T={t} median_ms={ms:.2f} threads={torch.get_num_threads()}")
    try:
        import onnxruntime as ort
    except ImportError:
        print("onnxruntime missing: pip install onnxruntime onnx")
        return
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "minilm.onnx")
        with torch.inference_mode():
            torch.onnx.export(
                model,
                (tids, tmask, ttypes),
                path,
                input_names=["ids", "mask", "types"],
                output_names=["embedding"],
                dynamo=False,
            )
        so = ort.SessionOptions()
        so.intra_op_num_threads = THREADS
        so.inter_op_num_threads = 1
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        feed = {"ids": ids, "mask": mask, "types": types}
        ms = timed(lambda: sess.run(None, feed), runs)
        out = sess.run(None, feed)[0]
        with torch.inference_mode():
            ref = model(tids, tmask, ttypes).numpy()
        err = float(np.abs(out - ref).max())
        print(f"onnxruntime size=B={b},T={t} median_ms={ms:.2f} max_abs_vs_pytorch={err:.2e}")


if __name__ == "__main__":
    main()

"""Peers for the ViT-S/16 rows of `tests/bench/run.sh`: Hugging Face's ViTModel (the encoder of
tests/bench/vit_s16.vlm) with PyTorch eager and ONNX Runtime, 2 threads, f32.

    python tests/bench/peers_vit.py save DIR            # random weights (seed 0) -> DIR
    python tests/bench/peers_vit.py time DIR B RUNS     # PyTorch eager and ONNX Runtime timings
    python tests/bench/peers_vit.py check DIR B VLMC    # vlmc run (compiled, interp.) vs PyTorch

`save` writes `ViTModel.save_pretrained` (model.safetensors + config.json) once; `vlmc bench
tests/bench/vit_s16.vlm --weights DIR/model.safetensors` then runs the same weights. The pixels
are those of `vlmc bench`'s synthetic float inputs (cli/src/bench.rs `synthetic_inputs`, input
0): element i of the [B, 3, 224, 224] tensor is ((i * 7919) % 1000) / 500 - 1, in f32.
Prints one `key=value` line per measurement (median over RUNS after two warm-up runs).
"""

import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from transformers import ViTConfig, ViTModel
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()

THREADS = 2
SEED = 0
IMAGE = 224


def config():
    return ViTConfig(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        intermediate_size=1536,
        patch_size=16,
        image_size=IMAGE,
        hidden_act="gelu",
        layer_norm_eps=1e-12,
        qkv_bias=True,
    )


def pixels(b, k=0):
    """vlmc bench's synthetic float input number k, bit for bit (f32 division, then - 1)."""
    n = b * 3 * IMAGE * IMAGE
    i = np.arange(n, dtype=np.int64)
    x = ((i * 7919 + k * 31) % 1000).astype(np.float32) / np.float32(500.0) - np.float32(1.0)
    return x.reshape(b, 3, IMAGE, IMAGE)


class Encoder(torch.nn.Module):
    """ViTModel's two outputs as a tuple (what tests/bench/vit_s16.vlm returns)."""

    def __init__(self, vit):
        super().__init__()
        self.vit = vit

    def forward(self, pixel_values):
        o = self.vit(pixel_values=pixel_values)
        return o.last_hidden_state, o.pooler_output


def load(wdir):
    # attention "eager", as the MiniLM peer (tests/bench/peers.py)
    vit = ViTModel.from_pretrained(wdir, attn_implementation="eager", dtype=torch.float32)
    return Encoder(vit).eval()


def timed(f, runs):
    f()
    f()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        f()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def save(wdir):
    if os.path.isfile(os.path.join(wdir, "model.safetensors")):
        print(f"vit_s16 weights in {wdir}")
        return
    torch.manual_seed(SEED)
    vit = ViTModel(config()).eval()
    tmp = wdir.rstrip("/") + ".partial"
    vit.save_pretrained(tmp)
    os.makedirs(os.path.dirname(os.path.abspath(wdir)), exist_ok=True)
    os.replace(tmp, wdir)
    n = sum(p.numel() for p in vit.parameters())
    print(f"vit_s16 weights in {wdir} (seed {SEED}, {n} parameters)")


def time_peers(wdir, b, runs):
    torch.set_num_threads(THREADS)
    model = load(wdir)
    x = pixels(b)
    tx = torch.from_numpy(x)
    size = f"B={b}"
    with torch.inference_mode():
        ms = timed(lambda: model(tx), runs)
        ref = [t.numpy() for t in model(tx)]
    threads = torch.get_num_threads()
    print(f"pytorch model=VitS16 size={size} median_ms={ms:.2f} threads={threads}")
    try:
        import onnxruntime as ort
    except ImportError:
        print("onnxruntime missing: pip install onnxruntime onnx")
        return
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "vit_s16.onnx")
        with torch.inference_mode():
            torch.onnx.export(
                model,
                (tx,),
                path,
                input_names=["pixels"],
                output_names=["last_hidden_state", "pooler_output"],
                dynamo=False,
            )
        so = ort.SessionOptions()
        so.intra_op_num_threads = THREADS
        so.inter_op_num_threads = 1
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        feed = {"pixels": x}
        ms = timed(lambda: sess.run(None, feed), runs)
        out = sess.run(None, feed)
        err = max(float(np.abs(o - r).max()) for o, r in zip(out, ref))
        print(
            f"onnxruntime model=VitS16 size={size} median_ms={ms:.2f} max_abs_vs_pytorch={err:.2e}"
        )


def check(wdir, b, vlmc):
    """`vlmc run` (compiled, then --interp) on the same pixels and weights vs PyTorch, in f32."""
    from safetensors.numpy import load_file

    torch.set_num_threads(THREADS)
    model = load(wdir)
    x = pixels(b)
    with torch.inference_mode():
        outs = model(torch.from_numpy(x))
    ref = {"last_hidden_state": outs[0].numpy(), "pooler_output": outs[1].numpy()}
    failed = False
    for how, flags in (("compiled", []), ("interpreter", ["--interp"])):
        with tempfile.TemporaryDirectory() as d:
            inp = os.path.join(d, "pixels.npy")
            out = os.path.join(d, "out.safetensors")
            np.save(inp, x)
            weights = os.path.join(wdir, "model.safetensors")
            cmd = [vlmc, "run", "tests/bench/vit_s16.vlm", "--weights", weights]
            cmd += ["--input", f"pixels={inp}", "-o", out] + flags
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"check: {' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}{r.stderr}")
            got = load_file(out)
        worst = 0.0
        for name, want in ref.items():
            g = got[name]
            assert g.shape == want.shape, f"{name}: vlmc {g.shape} vs PyTorch {want.shape}"
            abs_err = float(np.abs(g - want).max())
            rel = abs_err / float(np.abs(want).max())
            worst = max(worst, rel)
            print(
                f"check model=VitS16 size=B={b} vlmc={how} output={name} "
                f"max_abs_err={abs_err:.2e} rel_err={rel:.2e}"
            )
        verdict = "ok" if worst <= 1e-4 else "FAIL"
        failed |= worst > 1e-4
        print(
            f"check model=VitS16 size=B={b} vlmc={how} rel_err={worst:.2e} vs PyTorch "
            f"(max |vlmc - pytorch| / max |pytorch| over both outputs, bound 1e-4): {verdict}"
        )
    if failed:
        sys.exit(1)


def main():
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "save" and len(sys.argv) == 3:
        save(sys.argv[2])
    elif cmd == "time" and len(sys.argv) == 5:
        time_peers(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif cmd == "check" and len(sys.argv) == 5:
        check(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()

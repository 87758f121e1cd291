#!/usr/bin/env python3
"""PyTorch twins of the vlmc GPU benchmarks (tests/gpu/check.sh), eager and torch.compile, on the
same GPU, and the table comparing them with vlmc's timings. PyTorch runs as users run it
(transformers' default attention, SDPA where available).

    bench_torch.py --vlmc build/gpu/vlmc_bench.txt [--out build/gpu/torch_bench.json]

Reads vlmc's `BENCH {json}` lines, times the same architectures at the same sizes with random
weights (Hugging Face transformers, f32, no TF32), and prints medians and ratios. Without torch,
transformers or a GPU the PyTorch columns say why they are missing.
"""

import argparse
import json
import statistics
import sys
import time


def vlmc_results(path):
    out = {}
    with open(path) as f:
        for line in f:
            if line.startswith("BENCH "):
                r = json.loads(line[len("BENCH "):])
                out[r["model"]] = r
    return out


def timed(fn, warmup, iters):
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def minilm(torch, tf):
    cfg = tf.BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                        num_attention_heads=12, intermediate_size=1536,
                        max_position_embeddings=512)
    model = tf.BertModel(cfg, add_pooling_layer=False)
    b, t = 64, 128
    ids = (torch.arange(b * t).reshape(b, t) * 7 % 99 + 1).cuda()
    mask = torch.ones(b, t, dtype=torch.long).cuda()
    types = torch.zeros(b, t, dtype=torch.long).cuda()

    def forward(m):
        h = m(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        w = mask.unsqueeze(-1).float()
        e = (h * w).sum(1) / w.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(e, dim=-1)

    return model, forward


def vit_b16(torch, tf):
    cfg = tf.CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                              num_attention_heads=12, image_size=224, patch_size=16,
                              hidden_act="quick_gelu")
    model = tf.CLIPVisionModel(cfg).vision_model
    pixels = (torch.arange(32 * 3 * 224 * 224) * 7919 % 1000 / 500.0 - 1.0).reshape(32, 3, 224, 224).float().cuda()

    def forward(m):
        return m(pixel_values=pixels).last_hidden_state

    return model, forward


def llava_wide(torch, tf):
    vision = tf.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=2,
                                 num_attention_heads=16, image_size=336, patch_size=14,
                                 hidden_act="quick_gelu", projection_dim=768)
    text = tf.LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008,
                          num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=32,
                          rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096)
    # Defaults: image token 32000, features of layer -2 without CLS, a GELU projector.
    cfg = tf.LlavaConfig(vision_config=vision, text_config=text)
    model = tf.LlavaForConditionalGeneration(cfg)
    t = 608
    ids = torch.arange(t) * 7 % 99 + 1
    ids[:576] = 32000
    ids = ids.reshape(1, t).cuda()
    mask = torch.ones(1, t, dtype=torch.long).cuda()
    pixels = (torch.arange(3 * 336 * 336) * 7919 % 1000 / 500.0 - 1.0).reshape(1, 3, 336, 336).float().cuda()

    def forward(m):
        return m(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits

    return model, forward


TWINS = {"minilm": minilm, "vit_b16": vit_b16, "llava_wide": llava_wide}
SIZES = {"minilm": "64 × 128 tokens", "vit_b16": "32 images 224²", "llava_wide": "1 image 336² + 32 tokens"}


def torch_results(names, iters):
    try:
        import torch
        import transformers as tf
    except ImportError as e:
        return {n: {"error": f"no {e.name}"} for n in names}, "n/a"
    if not torch.cuda.is_available():
        return {n: {"error": "no CUDA in torch"} for n in names}, "n/a"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.cuda.get_device_name(0)
    out = {}
    for name in names:
        r = {}
        try:
            torch.manual_seed(0)
            model, forward = TWINS[name](torch, tf)
            model = model.cuda().eval()
            with torch.inference_mode():
                r["eager_ms"] = timed(lambda: forward(model), 3, iters)
                try:
                    compiled = torch.compile(model)
                    t0 = time.perf_counter()
                    forward(compiled)
                    torch.cuda.synchronize()
                    r["compile_s"] = time.perf_counter() - t0
                    r["compiled_ms"] = timed(lambda: forward(compiled), 3, iters)
                except Exception as e:  # torch.compile needs a working toolchain (triton)
                    r["compile_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
            del model
            torch.cuda.empty_cache()
        except Exception as e:
            r["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
        out[name] = r
    return out, device


def cell(x, fmt="{:.3f}"):
    return fmt.format(x) if isinstance(x, (int, float)) else "—"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vlmc", required=True, help="vlmc's output with BENCH lines")
    ap.add_argument("--out", help="write the PyTorch timings as JSON")
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    ours = vlmc_results(args.vlmc)
    names = [n for n in TWINS if n in ours]
    theirs, device = torch_results(names, args.iters)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": device, "results": theirs}, f, indent=1)
    vdev = next(iter(ours.values()), {}).get("device", "?")
    print(f"\nGPU: {vdev} (vlmc) / {device} (PyTorch); f32, medians of {args.iters} runs, ms")
    head = ["model", "size", "vlmc", "eager", "compile", "eager/vlmc", "compile/vlmc", "launches"]
    rows = []
    for n in names:
        v, t = ours[n], theirs.get(n, {})
        vm, em, cm = v.get("median_ms"), t.get("eager_ms"), t.get("compiled_ms")
        rows.append([
            n, SIZES[n], cell(vm), cell(em), cell(cm),
            cell(em / vm, "{:.2f}×") if em and vm else "—",
            cell(cm / vm, "{:.2f}×") if cm and vm else "—",
            str(v.get("launches", "?")),
        ])
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(x.ljust(w) for x, w in zip(r, widths)) + " |"
    print(line(head))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))
    for n in names:
        t = theirs.get(n, {})
        for k in ("error", "compile_error"):
            if k in t:
                print(f"note: {n}: PyTorch {k.replace('_', ' ')}: {t[k]}")
        if "compile_s" in t:
            print(f"note: {n}: torch.compile took {t['compile_s']:.1f} s; vlmc compile+load {ours[n].get('compile_load_s')} s")
    print("ratios above 1 mean vlmc is faster")
    return 0


if __name__ == "__main__":
    sys.exit(main())

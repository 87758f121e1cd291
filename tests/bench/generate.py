"""Helpers of tests/bench/generate.sh (text generation, SmolLM2-135M-Instruct, same weights).

  generate.py prompts W DIR T          the prompts: DIR/prompt.json (one prompt of exactly T tokens,
                                       its text and ids), DIR/prompt.txt (its text), DIR/batch.jsonl
                                       (8 such prompts, vlmc --data lines) and DIR/batch_ids.json;
                                       W is the Hugging Face folder (tokenizer.json)
  generate.py hf W DIR N THREADS       transformers generate (float32, eager attention, KV cache):
                                       batch 1 (time to first token, decode tokens/s), batch 8
  generate.py llama GGUF DIR N THREADS llama.cpp (llama-cpp-python) batch 1 on the same ids
  generate.py weights W                the f32 bytes a decode step reads (safetensors header)
  generate.py vlmc LABEL JSON DIR N CMD   one line from `vlmc generate --json` output (checks it)
  generate.py vlmc8 LABEL LOG OUT N CMD   one line from `vlmc generate --data` (stderr log, -o)
  generate.py table LOG                the markdown table of every line in LOG

Every measurement is one line `who key=value ...` on stdout (commands in `cmd="..."`), as in
peers.py, so that generate.sh can collect them and `table` can print them.
"""
import json
import os
import re
import shlex
import struct
import sys
import time

# A fixed text (written for this benchmark). The prompts are token windows of it, cut so that
# the text decodes and re-encodes to exactly the same ids (checked), so that every engine, fed
# text or ids, sees the same tokens.
TEXT = (
    "The lighthouse at the end of the northern breakwater was built in 1871 from granite quarried "
    "on the island itself, and for more than a century its keepers kept a daily log of the weather, "
    "the ships that passed and the state of the lamp. The first keeper, a former ship's carpenter "
    "named Thomas Hale, wrote in a careful hand about the fog that rolled in each autumn, the seals "
    "that gathered on the rocks below the tower, and the long winter nights when the oil froze in "
    "the reservoir and had to be warmed over the stove before it would burn. His successors were "
    "less patient writers, but the log survives almost complete, and historians have used it to "
    "reconstruct the traffic of the harbour, the changing routes of the fishing fleet and the slow "
    "retreat of the sea ice over the decades. In 1903 the oil lamp was replaced by an incandescent "
    "mantle burning paraffin vapour, which was brighter and cheaper to run, and in 1938 the station "
    "was connected to the mainland grid by a cable laid along the breakwater. The keepers then spent "
    "less time trimming wicks and more time maintaining the foghorn, a compressed air siren whose "
    "two tones could be heard twenty miles away on a still night. During the war the light was "
    "dimmed and the keepers reported the movements of convoys to the naval office in the town. "
    "After the war the station was modernised again: a rotating electric beacon replaced the old "
    "lens, a radio beacon was installed in a hut beside the tower, and the keepers' cottages were "
    "fitted with running water. The last keeper left in 1987, when the light was automated and "
    "its monitoring moved to a control room on the mainland. Today the tower is a museum. Visitors "
    "climb the one hundred and twelve steps of the spiral staircase, look out over the harbour "
    "from the gallery, and read the pages of the old log displayed in glass cases in the keepers' "
    "cottage, where the entries for each day describe the wind, the sea and the lamp"
)
BATCH = 8
EOS = 2


def tokenizer(w):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(os.path.join(w, "tokenizer.json"))


def window(tok, words, start, t):
    """The text of the first t tokens of words[start:], if it re-encodes to the same ids."""
    ids = tok.encode(" ".join(words[start:]), add_special_tokens=True).ids
    if len(ids) < t:
        return None
    ids = ids[:t]
    text = tok.decode(ids, skip_special_tokens=False)
    if text != text.strip() or tok.encode(text, add_special_tokens=True).ids != ids:
        return None
    return text, ids


def prompts(w, d, t):
    tok = tokenizer(w)
    words = TEXT.split()
    found = []
    start = 0
    while len(found) < 1 + BATCH:
        if start >= len(words):
            sys.exit(f"prompts: the text has too few {t}-token windows")
        p = window(tok, words, start, t)
        if p:
            found.append(p)
            start += 12  # the next prompt starts a dozen words later
        else:
            start += 1
    os.makedirs(d, exist_ok=True)
    text, ids = found[0]
    json.dump({"text": text, "ids": ids}, open(os.path.join(d, "prompt.json"), "w"))
    with open(os.path.join(d, "prompt.txt"), "w") as f:
        f.write(text)
    with open(os.path.join(d, "batch.jsonl"), "w") as f:
        for text, _ in found[1:]:
            f.write(json.dumps({"prompt": text}) + "\n")
    json.dump([ids for _, ids in found[1:]], open(os.path.join(d, "batch_ids.json"), "w"))
    print(f"prompts tokens={t} batch={BATCH} dir={d}")


def load_prompts(d):
    one = json.load(open(os.path.join(d, "prompt.json")))
    batch = json.load(open(os.path.join(d, "batch_ids.json")))
    return one["ids"], batch


def hf(w, d, n, threads):
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(threads)
    ids, batch = load_prompts(d)
    model = AutoModelForCausalLM.from_pretrained(
        w, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    # greedy, exactly n new tokens (no stop at EOS; the vlmc rows check that it emits none)
    def cfg(new):
        return GenerationConfig(do_sample=False, max_new_tokens=new, use_cache=True,
                                eos_token_id=None, pad_token_id=EOS, bos_token_id=1)

    class FirstToken(BaseStreamer):
        """Records when generate hands over the first new token (put #2; #1 is the prompt)."""

        def __init__(self):
            self.puts = 0
            self.at = None

        def put(self, value):
            self.puts += 1
            if self.puts == 2 and self.at is None:
                self.at = time.perf_counter()

        def end(self):
            pass

    def run(rows, new, stream=None):
        x = torch.tensor(rows, dtype=torch.long)
        mask = torch.ones_like(x)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=x, attention_mask=mask, generation_config=cfg(new),
                                 streamer=stream)
        return t0, time.perf_counter(), out[:, x.shape[1]:]

    run([ids], n)  # warm-up
    s = FirstToken()
    t0, t1, out = run([ids], n, s)
    ttft = s.at - t0
    toks = out[0].tolist()
    json.dump(toks, open(os.path.join(d, "hf_tokens.json"), "w"))
    cmd = f"python tests/bench/generate.py hf {w} {d} {n} {threads}"
    import transformers

    ver = f"version={transformers.__version__}"
    print(f"transformers {ver} batch=1 ttft_s={ttft:.4f} total_s={t1 - t0:.4f} "
          f"decode_tps={(len(toks) - 1) / (t1 - t0 - ttft):.2f} tokens={len(toks)} "
          f"eos_at={toks.index(EOS) if EOS in toks else -1} cmd={shlex.quote(cmd)}")
    # batch 8: the prompts are all t tokens long, so the left padding (pad = EOS, mask 0) is empty;
    # throughput = new tokens / the whole generate (prefill included), as for vlmc --data
    run(batch, min(n, 8))  # warm-up at this shape
    t0, t1, out = run(batch, n)
    total = out.shape[0] * out.shape[1]
    print(f"transformers {ver} batch={len(batch)} total_s={t1 - t0:.4f} new_tokens={total} "
          f"tps={total / (t1 - t0):.2f} cmd={shlex.quote(cmd)}")


def llama(gguf, d, n, threads):
    try:
        import llama_cpp
    except Exception as e:  # noqa: BLE001
        print(f"llama.cpp skipped=1 why={shlex.quote('llama_cpp not importable: ' + str(e))}")
        return
    ids, _ = load_prompts(d)
    llm = llama_cpp.Llama(model_path=gguf, n_ctx=max(512, len(ids) + n + 8), n_batch=512,
                          n_threads=threads, n_threads_batch=threads, verbose=False)

    def run(new):
        # greedy (top_k 1), llama.cpp's C sampler; generate() yields each token as it is chosen.
        # reset() first: else generate() reuses the key/value cache of the previous run's prompt
        llm.reset()
        toks = []
        t0 = time.perf_counter()
        first = None
        for tok in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0,
                                repeat_penalty=1.0, reset=True):
            if first is None:
                first = time.perf_counter()
            toks.append(tok)
            if len(toks) >= new:
                break
        return t0, first, time.perf_counter(), toks

    run(n)  # warm-up
    t0, first, t1, toks = run(n)
    ttft = first - t0
    ref = os.path.join(d, "hf_tokens.json")
    agree = ""
    if os.path.exists(ref):
        agree = f" agree_hf={common_prefix(toks, json.load(open(ref)))}"
    kind = os.path.basename(gguf)
    cmd = f"python tests/bench/generate.py llama {gguf} {d} {n} {threads}"
    print(f"llama.cpp weights={kind} batch=1 ttft_s={ttft:.4f} total_s={t1 - t0:.4f} "
          f"decode_tps={(len(toks) - 1) / (t1 - first):.2f} tokens={len(toks)}{agree} "
          f"version={llama_cpp.__version__} cmd={shlex.quote(cmd)}")


def common_prefix(a, b):
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k


def weights(w):
    """Elements x 4 over every tensor of model.safetensors: the f32 bytes one decode step reads
    (every matrix once; the tied embedding once, as the language head; the key/value cache and
    activations not counted)."""
    path = os.path.join(w, "model.safetensors")
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    n = 0
    for k, v in header.items():
        if k == "__metadata__":
            continue
        c = 1
        for s in v["shape"]:
            c *= s
        n += c
    print(f"weights params={n} f32_bytes={4 * n}")


def vlmc(label, path, d, n, cmd):
    """One `vlmc generate --json` result (`label` 1 or 2), or with `label` warm the second row
    of a `--data` run of the prompt twice (its plans were made for the first)."""
    try:
        lines = open(path).read().strip().splitlines()
        if label == "warm":
            j = [r for r in map(json.loads, lines) if r.get("index") == 1][0]
        else:
            j = json.loads(lines[-1])
    except (OSError, ValueError, IndexError, KeyError):
        print(f"vlmc run={label} batch=1 failed=1 cmd={shlex.quote(cmd)}")
        return
    toks = j["tokens"]
    ref = os.path.join(d, "hf_tokens.json")
    agree = ""
    if os.path.exists(ref):
        agree = f" agree_hf={common_prefix(toks, json.load(open(ref)))}"
    t = j["timing"]
    plans = f" plans_s={t['compile_s']:.4f}" if "compile_s" in t else ""
    ok = len(toks) == n and j["prompt_tokens"] == len(load_prompts(d)[0])
    print(f"vlmc run={label} batch=1 ttft_s={t['first_token_s']:.4f}{plans} "
          f"decode_tps={t['decode_tokens_per_s']:.2f} tokens={len(toks)} "
          f"prompt_tokens={j['prompt_tokens']} stop={j['stop_reason']}{agree} ok={int(ok)} "
          f"cmd={shlex.quote(cmd)}")


def vlmc8(label, log, out, n, cmd):
    m = None
    for line in open(log, errors="replace"):
        m = re.search(r"wrote .* \((\d+) prompts, (\d+) new tokens, ([\d.]+) tokens/s\)", line) or m
    if not m:
        print(f"vlmc run={label} batch={BATCH} failed=1 cmd={shlex.quote(cmd)}")
        return
    rows = [json.loads(x) for x in open(out) if x.strip()]
    lens = sorted(len(r["tokens"]) for r in rows)
    ok = lens == [n] * BATCH
    print(f"vlmc run={label} batch={m.group(1)} new_tokens={m.group(2)} tps={m.group(3)} "
          f"min_len={lens[0]} ok={int(ok)} cmd={shlex.quote(cmd)}")


def table(log):
    rows = []
    for line in open(log, errors="replace"):
        if not line.strip() or "=" not in line:
            continue
        try:
            parts = shlex.split(line)
        except ValueError:
            continue
        kv = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
        rows.append((parts[0], kv))

    def get(who, **f):
        return [kv for w, kv in rows if w == who and all(kv.get(k) == v for k, v in f.items())]

    def one(who):
        r = get(who)
        return r[-1] if r else {}

    s, mem, mem1, wts = one("setup"), one("membw"), one("membw1"), one("weights")
    n, t = s.get("new", "?"), s.get("prompt", "?")
    bws = [float(m["gbs"]) for m in (mem, mem1) if "gbs" in m]
    bw = max(bws) if bws else None
    wb = int(wts["f32_bytes"]) if "f32_bytes" in wts else None
    bound = bw * 1e9 / wb if bw and wb else None

    def frac(tps):
        return f"{100 * tps / bound:.0f} %" if bound else "-"

    def ms(x):
        return f"{1e3 * float(x):.0f} ms"

    print()
    print(f"Batch 1, a {t}-token prompt, {n} new tokens, greedy, {s.get('threads', '?')} threads "
          "(decode tokens/s = (new tokens - 1) / (total - time to first token)):")
    print()
    print("| engine | weights | time to first token | decode tokens/s | of the bandwidth bound "
          "| new tokens (equal to transformers') | command |")
    print("|---|---|---|---|---|---|---|")
    for kv in get("transformers", batch="1"):
        tps = float(kv["decode_tps"])
        print(f"| transformers {kv.get('version', '')} generate (eager, KV cache, after a warm-up) "
              f"| f32 | {ms(kv['ttft_s'])} | {tps:.1f} | {frac(tps)} | {kv['tokens']} "
              f"| `{kv['cmd']}` |")
    for kv in get("vlmc", batch="1"):
        if kv.get("failed"):
            print(f"| vlmc, run {kv['run']} | - | failed | - | - | - | `{kv['cmd']}` |")
            continue
        tps = float(kv["decode_tps"])
        plans = f" (plans {ms(kv['plans_s'])})" if "plans_s" in kv else ""
        note = "" if kv.get("ok") == "1" else f" **not {n}: {kv.get('stop')}**"
        what = {
            "1": "1st run",
            "2": "2nd run: kernels from the disk cache",
            "warm": "plans in memory: the 2nd prompt of one `--data` run, as transformers after "
                    "its warm-up",
        }.get(kv["run"], kv["run"])
        print(f"| vlmc generate ({what}) | f32 (bf16 file) | {ms(kv['ttft_s'])}{plans} "
              f"| {tps:.1f} | {frac(tps)} | {kv['tokens']}{note} ({kv.get('agree_hf', '?')}) "
              f"| `RAYON_NUM_THREADS={s.get('threads', 2)} {kv['cmd']}` |")
    for kv in get("llama.cpp"):
        if kv.get("skipped"):
            print(f"| llama.cpp | - | - | - | - | - | not run: {kv.get('why', '')} |")
            continue
        tps = float(kv["decode_tps"])
        kind = kv["weights"].replace("model-", "").replace(".gguf", "")
        b = frac(tps) + (" of the f32 bound" if kind != "f32" and bound else "")
        print(f"| llama.cpp (llama-cpp-python {kv.get('version', '')}) | {kind} GGUF "
              f"| {ms(kv['ttft_s'])} | {tps:.1f} | {b} | {kv['tokens']} "
              f"({kv.get('agree_hf', '?')}) | `{kv['cmd']}` |")
    print()
    print(f"Batch {BATCH} ({BATCH} prompts of {t} tokens, {n} new tokens each; tokens/s = new "
          "tokens / the whole generation, prefill included):")
    print()
    print("| engine | tokens/s | new tokens | command |")
    print("|---|---|---|---|")
    for kv in get("transformers", batch=str(BATCH)):
        print(f"| transformers generate (eager, KV cache, left padding) | {float(kv['tps']):.1f} "
              f"| {kv['new_tokens']} | `{kv['cmd']}` |")
    for kv in get("vlmc", batch=str(BATCH)):
        what = "2nd run" if kv["run"] == "2" else "1st run"
        if kv.get("failed"):
            print(f"| vlmc generate --data ({what}) | failed | - | `{kv['cmd']}` |")
            continue
        note = "" if kv.get("ok") == "1" else f" (**a row stopped at {kv['min_len']}**)"
        print(f"| vlmc generate --data ({what}) | {float(kv['tps']):.1f} | "
              f"{kv['new_tokens']}{note} | `RAYON_NUM_THREADS={s.get('threads', 2)} {kv['cmd']}` |")
    print()
    if bw:
        print(f"Memory read bandwidth (sum of a {mem.get('gib', '?')} GiB float32 array, best of "
              f"{mem.get('runs', '?')}): {mem.get('gbs', '?')} GB/s with {mem.get('threads', '?')} "
              f"threads, {mem1.get('gbs', '?')} GB/s with 1; the bound uses the larger, {bw:.1f} "
              f"GB/s (`cc -O3 -march=native -fopenmp tests/bench/membw.c -o membw && ./membw 1 "
              f"{mem.get('runs', 15)} {mem.get('threads', 2)}`, and `... 1 {mem.get('runs', 15)} 1`).")
    else:
        print("Memory read bandwidth: not measured (cc -fopenmp failed).")
    if wb:
        print(f"Weights read per decode step in f32: {wb / 1e6:.1f} MB "
              f"({int(wts['params']) / 1e6:.1f} M parameters x 4 bytes, from the safetensors "
              "header; the tied embedding counted once, as the language head)"
              + (f"; bound = bandwidth / bytes = {bound:.1f} tokens/s." if bound else "."))
    print("(agree_hf=K: the first K new tokens equal transformers' greedy tokens.)")
    print(f"Load average (1 min) at the start: {s.get('load_start', '?')}, at the end: "
          f"{one('end').get('load_end', '?')} (the benchmark itself adds about 2). PyTorch and "
          "llama.cpp use OpenMP, whose threads wait for each other at every op: with another "
          "job on one of the 2 cores they slow down several-fold; figures are worth keeping only "
          "when the start value is near 0.")


def main():
    a = sys.argv[1:]
    if not a:
        sys.exit(__doc__)
    cmd, a = a[0], a[1:]
    if cmd == "prompts":
        prompts(a[0], a[1], int(a[2]))
    elif cmd == "hf":
        hf(a[0], a[1], int(a[2]), int(a[3]))
    elif cmd == "llama":
        llama(a[0], a[1], int(a[2]), int(a[3]))
    elif cmd == "weights":
        weights(a[0])
    elif cmd == "vlmc":
        vlmc(a[0], a[1], a[2], int(a[3]), a[4])
    elif cmd == "vlmc8":
        vlmc8(a[0], a[1], a[2], int(a[3]), a[4])
    elif cmd == "table":
        table(a[0])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()

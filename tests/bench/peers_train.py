"""PyTorch eager peers of `vlmc bench --trainer` (tests/bench/train.sh): one training step
(forward and loss, backward, AdamW update) of the same model on the same weights and inputs,
2 threads, f32.

    python tests/bench/peers_train.py minilm MINILM_DIR OUT_DIR B T RUNS
    python tests/bench/peers_train.py llava OUT_DIR B T RUNS IMAGE VISION_DIM DIM VOCAB

minilm: tests/bench/minilm_pairs.vlm (all-MiniLM-L6-v2 on B sentence pairs, SigLIP's sigmoid
loss over the in-batch similarities); writes the weights vlmc reads (the MiniLM checkpoint plus
`logit_scale`, `logit_bias`) to OUT_DIR/model.safetensors.
llava: models/llava_tiny.vlm at the given widths (CLIP vision tower, penultimate layer without
CLS, MLP projector, Llama decoder with the image features as a prefix; SFT loss over every text
token), training the projector only as llava_tiny's `align` trainer (LLaVA stage 1); random
weights (seed 0) saved to OUT_DIR/model.safetensors with llava_tiny's names.

Inputs are `vlmc bench`'s synthetic ones: input k of the model, element i: token ids
1 + (i*7919 + k) % min(999, vocab - 1), masks of ones, token types of zeros, floats
((i*7919 + k*31) % 1000) / 500 - 1. Prints one `torch-train key=value` line: medians over RUNS
steps after two warm-up steps of the whole step and its parts, and the loss of the first step.
"""

import os
import statistics
import sys
import time

import torch
from safetensors.torch import load_file, save_file

THREADS = 2


def ids_of(b, t, k, vocab):
    top = max(1, min(999, vocab - 1))
    return torch.tensor([1 + (i * 7919 + k) % top for i in range(b * t)]).reshape(b, t)


def floats_of(shape, k):
    n = 1
    for s in shape:
        n *= s
    v = [((i * 7919 + k * 31) % 1000) / 500.0 - 1.0 for i in range(n)]
    return torch.tensor(v, dtype=torch.float32).reshape(shape)


def time_steps(params, loss_fn, lr, weight_decay, runs):
    """Medians (ms) of step, forward+loss, backward, update; and the first step's loss."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    parts = {"step": [], "fwd": [], "bwd": [], "update": []}
    first = None
    for r in range(runs + 2):
        opt.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss = loss_fn()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        if first is None:
            first = loss.item()
        if r >= 2:
            parts["fwd"].append((t1 - t0) * 1e3)
            parts["bwd"].append((t2 - t1) * 1e3)
            parts["update"].append((t3 - t2) * 1e3)
            parts["step"].append((t3 - t0) * 1e3)
    return {k: statistics.median(v) for k, v in parts.items()}, first


def report(model, b, t, med, loss):
    print(
        f"torch-train model={model} size=B={b},T={t} step_ms={med['step']:.2f} "
        f"fwd_ms={med['fwd']:.2f} bwd_ms={med['bwd']:.2f} update_ms={med['update']:.2f} "
        f"loss={loss:.6f} threads={torch.get_num_threads()}"
    )


def siglip_loss(logits):
    n = logits.shape[0]
    labels = 2.0 * torch.eye(n, logits.shape[1]) - 1.0
    return -torch.nn.functional.logsigmoid(labels * logits).sum() / n


def minilm(wdir, out, b, t, runs):
    from transformers import AutoModel

    bert = AutoModel.from_pretrained(wdir, attn_implementation="sdpa")
    bert.train()
    # BERT's dropout is not part of the vlmc model: switch it off.
    for m in bert.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    scale = torch.nn.Parameter(torch.tensor(2.302585))
    bias = torch.nn.Parameter(torch.tensor(-10.0))
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "model.safetensors")
    if not os.path.exists(path):
        tensors = load_file(os.path.join(wdir, "model.safetensors"))
        tensors["logit_scale"] = scale.detach().clone()
        tensors["logit_bias"] = bias.detach().clone()
        save_file({k: v.contiguous() for k, v in tensors.items()}, path + ".tmp")
        os.replace(path + ".tmp", path)
    vocab = bert.config.vocab_size
    ids, pos = ids_of(b, t, 0, vocab), ids_of(b, t, 3, vocab)
    ones, zeros = torch.ones(b, t, dtype=torch.long), torch.zeros(b, t, dtype=torch.long)

    def embed(i):
        h = bert(input_ids=i, attention_mask=ones, token_type_ids=zeros).last_hidden_state
        m = ones.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=1)

    def loss_fn():
        a, p = embed(ids), embed(pos)
        return siglip_loss(a @ p.T * scale.exp() + bias)

    med, loss = time_steps(list(bert.parameters()) + [scale, bias], loss_fn, 1e-4, 0.01, runs)
    report("MiniLMPairs", b, t, med, loss)


class LlavaTwin(torch.nn.Module):
    """llava_tiny's forward with its parameter names."""

    def __init__(self, image, vision_dim, dim, vocab):
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

        vc = CLIPVisionConfig(
            image_size=image, patch_size=8, hidden_size=vision_dim, num_hidden_layers=3,
            num_attention_heads=4, intermediate_size=4 * vision_dim, hidden_act="quick_gelu",
            layer_norm_eps=1e-5, attn_implementation="sdpa",
        )
        self.vision_tower = CLIPVisionModel(vc)
        self.multi_modal_projector = torch.nn.Module()
        self.multi_modal_projector.linear_1 = torch.nn.Linear(vision_dim, dim)
        self.multi_modal_projector.linear_2 = torch.nn.Linear(dim, dim)
        lc = LlamaConfig(
            vocab_size=vocab, hidden_size=dim, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0,
            max_position_embeddings=4096, tie_word_embeddings=False, attn_implementation="sdpa",
        )
        self.language_model = LlamaForCausalLM(lc)

    def loss(self, pixels, ids):
        hs = self.vision_tower(pixel_values=pixels, output_hidden_states=True).hidden_states
        feats = hs[-2][:, 1:, :]
        proj = self.multi_modal_projector
        prefix = proj.linear_2(torch.nn.functional.gelu(proj.linear_1(feats)))
        x = torch.cat([prefix, self.language_model.model.embed_tokens(ids)], dim=1)
        logits = self.language_model(inputs_embeds=x).logits
        text = logits[:, prefix.shape[1]:, :]
        v = text.shape[-1]
        return torch.nn.functional.cross_entropy(
            text[:, :-1, :].reshape(-1, v), ids[:, 1:].reshape(-1)
        )


def llava(out, b, t, runs, image, vision_dim, dim, vocab):
    torch.manual_seed(0)
    model = LlavaTwin(image, vision_dim, dim, vocab)
    model.train()
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "model.safetensors")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    # Buffers (CLIP's position_ids) are not parameters of the vlmc model.
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    save_file(state, path + ".tmp")
    os.replace(path + ".tmp", path)
    pixels = floats_of([b, 3, image, image], 0)
    ids = ids_of(b, t, 1, vocab)
    # LLaVA stage 1 (llava_tiny's `align` trainer): only the projector trains.
    trained = []
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("multi_modal_projector."))
        if p.requires_grad:
            trained.append(p)
    med, loss = time_steps(trained, lambda: model.loss(pixels, ids), 1e-4, 0.0, runs)
    report("LlavaTiny", b, t, med, loss)


def main():
    torch.set_num_threads(THREADS)
    which = sys.argv[1]
    if which == "minilm":
        wdir, out, b, t, runs = sys.argv[2], sys.argv[3], *map(int, sys.argv[4:7])
        minilm(wdir, out, b, t, runs)
    elif which == "llava":
        out = sys.argv[2]
        b, t, runs, image, vision_dim, dim, vocab = map(int, sys.argv[3:10])
        llava(out, b, t, runs, image, vision_dim, dim, vocab)
    else:
        sys.exit(f"unknown peer {which}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""What wire codecs and weight quantization cost, in bytes, time and quality, on the default model.

Quality is measured against the uncompressed swarm: the same fp32 model split as a 2-server swarm
([0:15) and [15:30)), with every hop's hidden states going through the codec exactly where the
swarm sends them (client -> server 1 -> client -> server 2 -> client). For each prompt, greedy
decoding without compression gives 32 reference tokens; the compressed model then reads the
prompt and those tokens in one pass (teacher forcing) and we count how often its greedy next token
agrees with the uncompressed model's in the same pass, and the mean KL divergence of its next-token distributions from the
uncompressed ones. Weight quantization (bitsandbytes int8/nf4 on every decoder layer's linear
weights) is measured the same way with an uncompressed wire. Prints tables and writes JSON.

    python scripts/bench_codecs.py --output bench-results/codecs.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from swarm.model_source import DEFAULT_MODEL, resolve_model
from swarm.server.quantization import quantize_linear_layers
from swarm.wire.codecs import CODECS, decode, encode, encoded_size

PROMPTS = [
    "What is the capital of France?", "Explain photosynthesis in simple words.", "Write a haiku about the sea.",
    "How do I reverse a list in Python?", "Give me three tips for better sleep.", "What causes rain?",
    "Summarize the plot of Romeo and Juliet.", "What is 17 times 23?", "Translate 'good morning' into Spanish.",
    "Why is the sky blue?", "Name the planets of the solar system.", "What is a prime number?",
    "Describe a cat to someone who has never seen one.", "How does a bicycle stay upright?",
    "What is the difference between weather and climate?", "Write a short thank-you note to a teacher.",
    "What are the primary colors?", "How do vaccines work?", "Suggest a name for a bakery.",
    "What is the boiling point of water at sea level?",
]
SPLIT = 15  # two servers: blocks [0, 15) and [15, 30)
NEW_TOKENS = 32


def add_wire_hooks(model, codec: str) -> list:  # noqa: ANN001
    """Round-trip hidden states through `codec` wherever the 2-server swarm would send them."""
    layers = model.model.layers
    last = len(layers) - 1

    def roundtrip(tensor: torch.Tensor) -> torch.Tensor:
        return decode(encode(tensor, codec)).to(tensor.dtype)

    def before(module, args, kwargs):  # noqa: ANN001, ANN202
        return (roundtrip(args[0]), *args[1:]), kwargs

    def after(module, args, kwargs, output):  # noqa: ANN001, ANN202
        return roundtrip(output)

    handles = []
    for index in (0, SPLIT):
        handles.append(layers[index].register_forward_pre_hook(before, with_kwargs=True))
    for index in (SPLIT - 1, last):
        handles.append(layers[index].register_forward_hook(after, with_kwargs=True))
    return handles


@torch.inference_mode()
def teacher_forced(model, sequences: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> dict:  # noqa: ANN001
    """Agreement of greedy next tokens with the reference, and mean KL(reference || model)."""
    agree, total, kls = 0, 0, []
    for prompt, reference_tokens, reference_logprobs in sequences:
        full = torch.cat([prompt, reference_tokens[:, :-1]], dim=1)
        logits = model(full).logits[:, prompt.shape[1] - 1 :]
        logprobs = F.log_softmax(logits.float(), dim=-1)
        agree += (logits.argmax(-1) == reference_logprobs.argmax(-1)).sum().item()
        total += reference_tokens.numel()
        kls.append(F.kl_div(logprobs, reference_logprobs, log_target=True, reduction="none").sum(-1).mean().item())
    return {"greedy_agreement": agree / total, "mean_kl": statistics.mean(kls)}


def codec_costs(codec: str, hidden_size: int) -> dict:
    one_token = torch.randn(1, 1, hidden_size) * 3
    prefill = torch.randn(1, 128, hidden_size) * 3
    message = encode(one_token, codec)
    times = []
    for _ in range(200):
        began = time.perf_counter()
        decode(encode(one_token, codec))
        times.append(time.perf_counter() - began)
    began = time.perf_counter()
    decode(encode(prefill, codec))
    prefill_ms = (time.perf_counter() - began) * 1e3
    return {"payload_bytes_per_token": encoded_size(message), "message_bytes_per_token": len(message.SerializeToString()),
            "roundtrip_ms_per_token": statistics.median(times) * 1e3, "roundtrip_ms_128_tokens": prefill_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint directory or alias (default: %(default)s)")
    parser.add_argument("--codecs", nargs="+", default=list(CODECS), choices=CODECS, help="wire codecs to measure (default: all)")
    parser.add_argument("--no-weights", action="store_true", help="skip the weight quantization table")
    parser.add_argument("--output", type=Path, default=Path("bench-results/codecs.json"), help="JSON file (default: %(default)s)")
    args = parser.parse_args()
    torch.manual_seed(0)
    checkpoint = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()

    sequences = []
    with torch.inference_mode():
        for text in PROMPTS:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                   return_tensors="pt", return_dict=True)["input_ids"]
            output = model.generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
            reference_tokens = output[:, prompt.shape[1]:]
            full = torch.cat([prompt, reference_tokens[:, :-1]], dim=1)
            reference_logprobs = F.log_softmax(model(full).logits[:, prompt.shape[1] - 1 :].float(), dim=-1)
            sequences.append((prompt, reference_tokens, reference_logprobs))

    hidden = model.config.hidden_size
    bf16_bytes = codec_costs("bf16", hidden)["payload_bytes_per_token"]
    wire = []
    for codec in args.codecs:
        handles = add_wire_hooks(model, codec)
        quality = teacher_forced(model, sequences)
        for handle in handles:
            handle.remove()
        costs = codec_costs(codec, hidden)
        wire.append({"codec": codec, **costs, "vs_bf16_bytes": costs["payload_bytes_per_token"] / bf16_bytes, **quality})

    weights = []
    for quant_type in () if args.no_weights else ("none", "int8", "nf4"):
        quantized = copy.deepcopy(model)
        quantize_linear_layers(quantized.model.layers, quant_type, torch.float32)
        block_bytes = sum(t.numel() * t.element_size() for t in quantized.model.layers[0].state_dict().values()
                          if isinstance(t, torch.Tensor))
        weights.append({"quant_type": quant_type, "bytes_per_block": block_bytes, **teacher_forced(quantized, sequences)})
        del quantized

    print(f"\nWire codecs on {checkpoint.name}, 2-server split at block {SPLIT}, {len(PROMPTS)} prompts x {NEW_TOKENS} tokens")
    print(f"{'codec':<7}{'bytes/token/hop':>16}{'vs bf16':>9}{'enc+dec ms':>12}{'(128 tok)':>11}{'greedy agree':>14}{'mean KL':>10}")
    for row in wire:
        print(f"{row['codec']:<7}{row['payload_bytes_per_token']:>16}{row['vs_bf16_bytes']:>9.2f}{row['roundtrip_ms_per_token']:>12.3f}"
              f"{row['roundtrip_ms_128_tokens']:>11.2f}{row['greedy_agreement']:>14.2%}{row['mean_kl']:>10.5f}")
    print(f"\nWeight quantization (uncompressed wire)")
    print(f"{'quant':<7}{'MB/block':>10}{'greedy agree':>14}{'mean KL':>10}")
    for row in weights:
        print(f"{row['quant_type']:<7}{row['bytes_per_block'] / 1e6:>10.2f}{row['greedy_agreement']:>14.2%}{row['mean_kl']:>10.5f}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"model": checkpoint.name, "wire": wire, "weights": weights}, indent=2))
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()

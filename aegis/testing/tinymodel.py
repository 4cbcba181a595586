"""Write a tiny random Llama model (and LoRA adapters) for CPU vLLM tests, offline and from a seed.

Standalone script, run with the vLLM venv's python (aegis is not installed
there); only the standard library is imported at module level:

    python tinymodel.py --out DIR [--seed 0] [--lora N]

DIR gets a byte-level BPE tokenizer (PreTrainedTokenizerFast, 512 tokens,
with a chat template) and a randomly initialised LlamaForCausalLM (hidden 256,
4 heads, 2 KV heads, head_dim 64, 2 layers, bfloat16, ~3 MB); `--lora N` adds
N PEFT-format adapters in DIR/loras/lora-<i> (rank 8 on q/k/v/o_proj).
The same seed gives the same files.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

VOCAB_SIZE = 512
HIDDEN = 256
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 64
LAYERS = 2
INTERMEDIATE = 512
MAX_POSITIONS = 2048
LORA_RANK = 8
LORA_ALPHA = 16
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
# Recorded in adapter configs instead of a path (the model is written to a temporary directory).
BASE_NAME = "aegis-tiny-llama"

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
SPECIAL_TOKENS = [BOS, EOS, PAD, *ROLE_TOKENS]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def corpus(seed: int, sentences: int = 4000) -> list[str]:
    """Pseudo-English text from a seed: syllable words, digits and punctuation."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghklmnprstvwz" for v in "aeiou"] + ["the", "and", "ing", "ion", "er"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(600)]
    out = []
    for _ in range(sentences):
        n = rng.randint(4, 14)
        sent = " ".join(rng.choice(words) for _ in range(n))
        if rng.random() < 0.2:
            sent += f" {rng.randint(0, 9999)}"
        out.append(sent.capitalize() + rng.choice([".", ".", "?", "!", ",\n"]))
    return out


def write_tokenizer(out: Path, seed: int) -> None:
    """Train a byte-level BPE on the seeded corpus and save it as PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus(seed), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    if tok.get_vocab_size() != VOCAB_SIZE:
        raise SystemExit(f"tokenizer has {tok.get_vocab_size()} tokens, expected {VOCAB_SIZE}")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   additional_special_tokens=ROLE_TOKENS,
                                   model_max_length=MAX_POSITIONS, chat_template=CHAT_TEMPLATE)
    fast.save_pretrained(str(out))


def write_model(out: Path, seed: int) -> None:
    """Save a randomly initialised bfloat16 LlamaForCausalLM with safetensors."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(out))
    config = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                         num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                         num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                         max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=False,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id,
                                               eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    model.save_pretrained(str(out), safe_serialization=True)
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    # Older and newer transformers name the dtype key differently: write both.
    cfg["torch_dtype"] = cfg["dtype"] = "bfloat16"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def lora_tensors(index: int, seed: int) -> dict:
    """PEFT tensor name -> random bfloat16 tensor for adapter `index` (B is non-zero)."""
    import torch

    gen = torch.Generator().manual_seed(seed * 1000 + index + 1)
    out_dims = {"q_proj": HEADS * HEAD_DIM, "k_proj": KV_HEADS * HEAD_DIM,
                "v_proj": KV_HEADS * HEAD_DIM, "o_proj": HIDDEN}
    in_dims = {"q_proj": HIDDEN, "k_proj": HIDDEN, "v_proj": HIDDEN, "o_proj": HEADS * HEAD_DIM}
    tensors = {}
    for layer in range(LAYERS):
        for mod in LORA_TARGETS:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{mod}"
            a = torch.randn(LORA_RANK, in_dims[mod], generator=gen) / in_dims[mod] ** 0.5
            b = torch.randn(out_dims[mod], LORA_RANK, generator=gen) * 0.5
            tensors[f"{prefix}.lora_A.weight"] = a.to(torch.bfloat16).contiguous()
            tensors[f"{prefix}.lora_B.weight"] = b.to(torch.bfloat16).contiguous()
    return tensors


def adapter_config() -> dict:
    """The adapter_config.json PEFT writes for these adapters."""
    return {
        "base_model_name_or_path": BASE_NAME, "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "lora_alpha": LORA_ALPHA,
        "lora_dropout": 0.0, "modules_to_save": None, "peft_type": "LORA", "r": LORA_RANK,
        "target_modules": sorted(LORA_TARGETS), "task_type": "CAUSAL_LM",
        "use_dora": False, "use_rslora": False,
    }


def write_loras(out: Path, count: int, seed: int) -> None:
    """Write `count` adapters to out/loras/lora-<i>, with peft when importable, else by hand."""
    try:
        import peft  # noqa: F401
    except ImportError:
        peft = None
    for i in range(count):
        dest = out / "loras" / f"lora-{i}"
        tensors = lora_tensors(i, seed)
        if peft is not None:
            _write_lora_with_peft(out, dest, tensors)
        else:
            from safetensors.torch import save_file

            dest.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(dest / "adapter_model.safetensors"), metadata={"format": "pt"})
            (dest / "adapter_config.json").write_text(
                json.dumps(adapter_config(), indent=2, sort_keys=True) + "\n")


def _write_lora_with_peft(base: Path, dest: Path, tensors: dict) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(base), torch_dtype=torch.bfloat16)
    cfg = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                     target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM")
    pmodel = get_peft_model(model, cfg)
    state = {k.replace(".default", ""): v for k, v in pmodel.state_dict().items() if "lora_" in k}
    if set(state) != set(tensors):
        raise SystemExit(f"peft names differ from the hand-written ones: {sorted(set(state) ^ set(tensors))[:4]}")
    with torch.no_grad():
        for name, param in pmodel.named_parameters():
            key = name.replace(".default", "")
            if key in tensors:
                param.copy_(tensors[key])
    pmodel.save_pretrained(str(dest), safe_serialization=True)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and write the tokenizer, model and adapters."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to write (created)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lora", type=int, default=0, metavar="N", help="LoRA adapters to write")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    write_tokenizer(args.out, args.seed)
    write_model(args.out, args.seed)
    write_loras(args.out, args.lora, args.seed)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

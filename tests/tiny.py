"""Tiny random models of every supported architecture, built locally from configs (no Hub access)."""

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

VOCAB = 96
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, head_dim=8)
_SPECIFIC = {
    "gpt2": dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "gpt_neox": dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64),
    "opt": dict(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64, word_embed_proj_dim=32),
    "bert": dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=64),
    "roberta": dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=70, pad_token_id=1),
    "phi3": dict(_COMMON, pad_token_id=0),
    "gemma3_text": dict(_COMMON, num_key_value_heads=1),  # as Gemma 3 270M and 1B: one KV head
}
ENCODERS = ("bert", "roberta")
# model_type -> expected role of each converted site, for a 2-layer model (the head's own prefix excluded).
DECODER_ROLES = {"attn_input": 2, "mlp_input": 2, "final": 1}
EXPECTED_ROLES = {
    "llama": DECODER_ROLES, "mistral": DECODER_ROLES, "qwen2": DECODER_ROLES, "phi3": DECODER_ROLES,
    "gemma": DECODER_ROLES, "gpt2": DECODER_ROLES, "gpt_neox": DECODER_ROLES, "opt": DECODER_ROLES,
    "qwen3": {**DECODER_ROLES, "q_norm": 2, "k_norm": 2},
    "gemma2": {"attn_input": 2, "post_attn": 2, "mlp_input": 2, "post_mlp": 2, "final": 1},
    "gemma3_text": {"attn_input": 2, "post_attn": 2, "mlp_input": 2, "post_mlp": 2, "final": 1, "q_norm": 2,
                    "k_norm": 2},
    "olmo2": {"post_attn": 2, "post_mlp": 2, "final": 1, "q_norm": 2, "k_norm": 2},
    "olmo3": {"post_attn": 2, "post_mlp": 2, "final": 1, "q_norm": 2, "k_norm": 2},
    "bert": {"embedding": 1, "post_attn": 2, "post_mlp": 2, "final": 1},
    "roberta": {"embedding": 1, "post_attn": 2, "post_mlp": 2, "final": 1},
}
ARCHITECTURES = tuple(EXPECTED_ROLES)


def tiny_config(model_type: str):
    return AutoConfig.for_model(model_type, **_SPECIFIC.get(model_type, _COMMON))


def tiny_model(model_type: str, seed: int = 0):
    """A random tiny model whose norm weights and biases are random too, so that gamma mapping errors show."""
    torch.manual_seed(seed)
    auto = AutoModelForMaskedLM if model_type in ENCODERS else AutoModelForCausalLM
    model = auto.from_config(tiny_config(model_type)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name.lower() or ".ln_" in name or "ln_f" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


def tiny_inputs(batch: int = 2, length: int = 12, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


WORDS = ("the a one two red blue cat dog runs sees eats big small old new house tree river city king queen "
         "sun moon star sky sea and or but with from into over under near far fast slow green black white "
         "bird fish horse song book road hill stone fire water wind rain snow light dark day night").split()


def tiny_text(sentences: int = 400, seed: int = 0) -> str:
    """Pseudo-English with some structure (a tiny model can learn it a little)."""
    import random

    rng = random.Random(seed)
    lines = []
    for _ in range(sentences):
        subject, verb, obj = rng.choice(WORDS[:6]), rng.choice(("runs", "sees", "eats")), rng.choice(WORDS[6:])
        lines.append(f"{subject} {rng.choice(WORDS[8:16])} {subject} {verb} {obj} {rng.choice(WORDS[16:])} .")
    return "\n".join(lines)


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<unk>", "<s>", "</s>", ".", *dict.fromkeys(WORDS)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    assert len(vocab) <= VOCAB
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def save_tiny_checkpoint(folder, model_type: str = "llama", seed: int = 0):
    """A tiny model with a tokenizer and a text file beside it: what distillation needs, without assets."""
    from pathlib import Path

    folder = Path(folder)
    tiny_model(model_type, seed).save_pretrained(folder / "model")
    tiny_tokenizer().save_pretrained(folder / "model")
    (folder / "text.txt").write_text(tiny_text())
    return folder / "model", folder / "text.txt"


def linear_weight_stds_in_file(folder) -> torch.Tensor:
    """The std of each of a saved checkpoint's linear weights, read from its safetensors file: every 2-D weight but
    the embedding and the LM head (their median is the scale relative learning rates are a fraction of)."""
    from pathlib import Path

    from safetensors.torch import load_file

    weights = load_file(str(Path(folder) / "model.safetensors"))
    return torch.stack([w.float().std() for name, w in weights.items()
                        if w.dim() == 2 and "embed" not in name and "lm_head" not in name])


def reload_without_hf_dynorm(folder, inputs, expected, masked_lm: bool = False) -> tuple[bool, str]:
    """Load `folder` with trust_remote_code in a subprocess where hf_dynorm cannot be imported; True if its logits
    on `inputs` equal `expected` bit for bit. Returns (identical, stderr)."""
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as scratch:
        torch.save(inputs, Path(scratch) / "inputs.pt")
        torch.save(expected, Path(scratch) / "expected.pt")
        auto = "AutoModelForMaskedLM" if masked_lm else "AutoModelForCausalLM"
        script = (f"import sys, torch; sys.modules['hf_dynorm'] = None\nfrom transformers import {auto}\n"
                  f"m = {auto}.from_pretrained({str(folder)!r}, trust_remote_code=True)\n"
                  f"logits = m(torch.load({str(Path(scratch) / 'inputs.pt')!r})).logits\n"
                  f"print('IDENTICAL', torch.equal(logits, torch.load({str(Path(scratch) / 'expected.pt')!r})))\n")
        run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                             stdin=subprocess.DEVNULL)
    return "IDENTICAL True" in run.stdout, run.stderr[-2000:]


def hand_mean_nll(model, ids, window: int) -> float:
    """Mean NLL over disjoint windows of `window` tokens (the last one shorter where the text ends; each window's
    first token unscored), written out from the definition in float64: log_softmax of the logits, the
    log-probability of each next token. A second implementation for tests to compare hf_dynorm's evaluation with."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, ids.numel() - 1, window):
            tokens = ids[start:start + window]
            log_probs = torch.log_softmax(model(tokens[None]).logits[0].double(), dim=-1)
            for position in range(tokens.numel() - 1):
                total -= float(log_probs[position, tokens[position + 1]])
                count += 1
    return total / count

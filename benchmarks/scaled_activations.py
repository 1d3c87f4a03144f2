"""A travel probe: SmolLM2-135M with every residual-stream activation S times larger, the same function.

    python benchmarks/scaled_activations.py --scale 10 --out outputs/smollm2-x10
    hf-dynorm distill --config recipes/smollm2-135m/dyt.yaml --model outputs/smollm2-x10 --output_dir outputs/x10

Pre-norm RMSNorm is blind to the scale of its input (up to eps), so multiplying the embeddings and every block's
output projections (`o_proj`, `down_proj`) by S leaves the logits unchanged (the LM head is untied from the scaled
embeddings first) while every norm site sees S times larger input, as in a model whose activations are larger than
SmolLM2's. A recipe whose settings follow from the model's own statistics ends where it ends on SmolLM2; a setting
fixed in absolute units does not (README, "Pure element-wise models"). Prints the largest logit difference to the
original on a sentence, which must be small against the logits themselves.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hf_dynorm import load_model, load_tokenizer  # noqa: E402

SENTENCE = "The history of the city begins in the twelfth century, when a small market grew up beside the river."


def scaled(model, scale: float):
    """The Llama-family `model` with its residual stream multiplied by `scale`, in place."""
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # its own copy, if tied
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(scale)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(scale)
            layer.mlp.down_proj.weight.mul_(scale)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--scale", type=float, default=10.0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.model)
    ids = tokenizer(SENTENCE, return_tensors="pt").input_ids
    model = load_model(args.model)
    with torch.no_grad():
        original = model(ids).logits
        model = scaled(model, args.scale)
        difference = (model(ids).logits - original).abs().max().item()
    print(f"largest logit difference {difference:.3g} (largest logit {original.abs().max().item():.3g})")
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)


if __name__ == "__main__":
    main()

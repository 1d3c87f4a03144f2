"""Why a pure element-wise swap explodes, and what stops it: four zero-shot starts of pure DyISRU side by side.

    python benchmarks/pure_start.py --homogenised OUTPUT/homogenised [--out benchmarks/results]

OUTPUT/homogenised is the first stage of a pure recipe (`hf-dynorm distill --config
recipes/smollm2-135m/dyisru-pure.yaml` writes it). Every start is pure DyISRU with the per-channel range bound
(range_bound 1.5, calibrated on 16 x 512 training tokens of the model being converted) at all sites:

- pure: the original model swapped;
- pure + sink: the same, with a constant sink prefix (<|endoftext|>'s keys/values, computed with the norms in place);
- homogenised: the homogenised model swapped, no sink;
- homogenised + sink: the pure recipes' start.

For each: the perplexity ratio to the original on 4 x 512 held-out wiki-sample tokens, and per layer the median
residual rms of ordinary tokens (positions >= 1) with the share of them holding an element above 100 in absolute
value (a massive activation), beside the original's. Writes pure_start.json and pure_start.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hf_dynorm import convert, load_model, load_tokenizer  # noqa: E402
from hf_dynorm.calibration import calibrate  # noqa: E402
from hf_dynorm.data import full_windows, token_stream  # noqa: E402
from hf_dynorm.distill import sink_token  # noqa: E402
from hf_dynorm.evaluation import exp_nll, perplexity  # noqa: E402
from hf_dynorm.reports import markdown_table  # noqa: E402

LAYERS_SHOWN = (2, 4, 5, 6, 8, 12, 16, 20, 24, 28)
MASSIVE = 100.0


@torch.no_grad()
def residual_profile(model, windows: torch.Tensor) -> list[dict]:
    """Per layer output: the median token rms and the share of tokens with max |h| > MASSIVE, positions >= 1."""
    hidden = model(input_ids=windows, output_hidden_states=True).hidden_states
    rows = []
    for layer, h in enumerate(hidden):
        h = h[:, 1:].float()
        rms = h.square().mean(-1).sqrt()
        rows.append({"layer": layer, "median_rms": rms.median().item(),
                     "massive_share": (h.abs().amax(-1) > MASSIVE).float().mean().item()})
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--homogenised", required=True, help="OUTPUT/homogenised of a pure recipe's run")
    parser.add_argument("--range-bound", type=float, default=1.5)
    parser.add_argument("--windows", type=int, default=4, help="held-out windows of 512 tokens")
    parser.add_argument("--calibration-windows", type=int, default=16, help="training windows of 512 tokens")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    if not (Path(args.homogenised) / "homogenise.json").exists():
        parser.error(f"{args.homogenised} holds no homogenise.json: pass the homogenised/ folder of a pure recipe's "
                     "output_dir (hf-dynorm distill --config recipes/smollm2-135m/dyisru-pure.yaml).")

    torch.manual_seed(0)
    tokenizer = load_tokenizer(args.model)
    original, homogenised = load_model(args.model), load_model(args.homogenised)
    ids = token_stream("wiki-sample", tokenizer, "test")
    windows = full_windows(ids, 512, args.windows)
    reference_nll = perplexity(original, windows.flatten(), window=512, progress=False).mean_nll
    sink = sink_token(tokenizer, "auto")

    starts = {"pure": (original, None), "pure + sink": (original, sink),
              "homogenised": (homogenised, None), "homogenised + sink": (homogenised, sink)}
    calibrations = {id(m): calibrate(m, "wiki-sample", tokenizer=tokenizer, split="train", window=512,
                                     max_windows=args.calibration_windows) for m in (original, homogenised)}
    results = {"model": args.model, "range_bound": args.range_bound,
               "sink_token": tokenizer.convert_ids_to_tokens(sink), "held_out_tokens": windows.numel(),
               "original": residual_profile(original, windows), "starts": {}}
    for name, (base, token) in starts.items():
        student = convert(copy.deepcopy(base), "dyisru", calibration=calibrations[id(base)],
                          range_bound=args.range_bound, sink_token=token)
        nll = perplexity(student, windows.flatten(), window=512, progress=False).mean_nll
        ratio = exp_nll(nll - reference_nll)
        results["starts"][name] = {"perplexity_ratio": ratio, "layers": residual_profile(student, windows)}
        print(f"{name:20} perplexity ratio {ratio:.4g}", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pure_start.json").write_text(json.dumps(results, indent=2))
    profiles = {"original": results["original"]} | {k: v["layers"] for k, v in results["starts"].items()}
    header = ["layer"] + list(profiles)
    rows = [[str(layer)] + [f"{p[layer]['median_rms']:.1f} / {p[layer]['massive_share']:.2f}" for p in
                            profiles.values()] for layer in LAYERS_SHOWN if layer < len(results["original"])]
    ratios = [["perplexity ratio", "1"] + [f"{v['perplexity_ratio']:.3g}" for v in results["starts"].values()]]
    (out / "pure_start.md").write_text(
        "Median residual rms of ordinary tokens / share with an element above 100, per layer output\n\n"
        + markdown_table(header, ratios + rows) + "\n")
    return results


if __name__ == "__main__":
    main()

"""The main job on the embedded defaults: convert SmolLM2-135M, save, reload, and compare with the original."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from .assets import EMBEDDED_TEXT
from .calibration import calibrate
from .conversion import convert, save_converted
from .data import token_stream
from .evaluation import perplexity
from .reports import markdown_table, write_results

PROMPT = "The history of the Roman Empire"


def greedy(model, tokenizer, prompt: str = PROMPT, tokens: int = 24) -> str:
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=tokens, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def run_demo(out, *, model_id="smollm2-135m", norm: str = "dyisru", anchors: int = 4, eval_windows: int = 4,
             calibration_windows: int = 16) -> dict:
    from . import load_model, load_tokenizer

    out = Path(out)
    step = _Steps()
    tokenizer = load_tokenizer(model_id)
    original = load_model(model_id)
    ids = token_stream(EMBEDDED_TEXT, tokenizer, "test")[: eval_windows * 512]
    step("loaded model and text")

    cal = calibrate(original, EMBEDDED_TEXT, tokenizer=tokenizer, split="train", max_windows=calibration_windows)
    step(f"calibrated on {cal.tokens} tokens")
    converted = convert(load_model(model_id), norm, calibration=cal, anchors=anchors if norm == "dyisru" else None)
    save_converted(converted, out / "model", tokenizer, overwrite=True)
    reloaded = load_model(out / "model")
    probe = ids[:256][None]
    with torch.no_grad():
        identical = torch.equal(converted(probe).logits, reloaded(probe).logits)
    if not identical:
        raise RuntimeError("the reloaded model's logits differ from the converted model's: please report this bug.")
    step(f"converted {len(converted.config.dynorm['sites'])} norms to {norm}, saved to {out / 'model'}, reloaded "
         "bit-identically")

    before, after = perplexity(original, ids, progress=False), perplexity(reloaded, ids, progress=False)
    ratio = math.exp(min(after.mean_nll - before.mean_nll, 700))
    generations = {"original": greedy(original, tokenizer), "converted": greedy(reloaded, tokenizer)}
    step("evaluated")
    results = {"model": model_id, "norm": norm, "anchors": anchors, "original": before.to_dict(),
               "converted": after.to_dict(), "perplexity_ratio": ratio, "prompt": PROMPT, "generations": generations,
               "reload_bit_identical": identical, "seconds": step.log}
    report = (f"# hf_dynorm demo: {model_id} -> {norm} (anchors {anchors}), no training\n\n"
              + markdown_table(["model", "perplexity", "worst window NLL", "greedy continuation of " + repr(PROMPT)],
                               [["original", before.perplexity, before.window_nll_percentiles["p100"],
                                 generations["original"].replace("\n", " ")],
                                ["converted", after.perplexity, after.window_nll_percentiles["p100"],
                                 generations["converted"].replace("\n", " ")]])
              + f"\nPerplexity ratio: **{ratio:.4g}** on {after.tokens} held-out tokens.\n")
    write_results(out, results, report)
    print(report)
    print(f"results in {out.resolve()}")
    return results


class _Steps:
    """Prints progress with elapsed time and keeps it for results.json."""

    def __init__(self):
        self.start, self.log = time.perf_counter(), {}

    def __call__(self, message: str) -> None:
        elapsed = time.perf_counter() - self.start
        self.log[message] = round(elapsed, 1)
        print(f"[{elapsed:6.1f} s] {message}", flush=True)

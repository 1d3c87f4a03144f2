"""The embedded SmolLM2-135M: converts, calibrates, saves and reloads bit-identically (CI runs it)."""

import json
import math
from pathlib import Path

import pytest
import torch

import hf_dynorm
from hf_dynorm.conversion import save_converted
from hf_dynorm.data import full_windows, token_stream
from hf_dynorm.evaluation import perplexity
from tiny import hand_mean_nll, reload_without_hf_dynorm

pytestmark = pytest.mark.real_model


def test_smollm2_registry_calibration_and_round_trip(smollm2, tmp_path):
    model, tokenizer = smollm2
    sites = hf_dynorm.find_norm_sites(model)
    assert len(sites) == 61 and sum(site.role == "final" for site in sites) == 1
    ids = token_stream("wiki-sample", tokenizer, "test")[:1024]
    original = perplexity(model, ids, progress=False)
    assert 5 < original.perplexity < 60

    converted = hf_dynorm.load_model("smollm2-135m")
    hf_dynorm.convert(converted, "dyisru", calibration="wiki-sample", tokenizer=tokenizer, max_windows=4,
                      anchors=4, progress=False)
    record = converted.config.dynorm
    assert record["calibration"]["tokens"] == 4 * 512 and len(record["sites"]) == 61
    # the anchors are the 4 channels of largest |x| in the calibration windows: found again here by a hook on the
    # site's input over the same windows (the first 4 windows of 512 tokens of the train split)
    site = "model.layers.15.post_attention_layernorm"
    windows = token_stream("wiki-sample", tokenizer, "train")[:4 * 512].view(4, 512)
    largest = torch.zeros(model.config.hidden_size)
    hook = model.get_submodule(site).register_forward_pre_hook(
        lambda module, args: largest.copy_(torch.maximum(largest, args[0].detach().abs().amax((0, 1)))))
    with torch.no_grad():
        model(windows)
    hook.remove()
    assert record["calibration"]["sites"][site]["anchors"] == sorted(torch.topk(largest, 4).indices.tolist())

    save_converted(converted, tmp_path / "model", tokenizer)
    probe = ids[:128][None]
    with torch.no_grad():
        expected = converted(probe).logits
        assert torch.equal(hf_dynorm.load_model(tmp_path / "model")(probe).logits, expected)
    identical, errors = reload_without_hf_dynorm(tmp_path / "model", probe, expected)
    assert identical, errors
    assert json.loads((tmp_path / "model" / "config.json").read_text())["dynorm"]["norm"] == "dyisru"


def test_main_job_runs_the_shipped_recipe_end_to_end(smollm2, tmp_path):
    """`hf-dynorm demo` = the packaged smollm2-135m/dyisru.yaml cut short (here to 2 steps): settings, files, report."""
    from hf_dynorm.demo import run_demo

    original, tokenizer = smollm2
    summary = run_demo(tmp_path, ["--max_steps", "2", "--warmup_steps", "1", "--ramp_steps", "1",
                                  "--eval_windows", "1", "--calibration_windows", "1"])
    assert summary["anchored"] and summary["tokens"] == 2 * 1 * 256
    # the ratio of the saved model to the original, by hand on the held-out window it was scored on
    held_out = token_stream("wiki-sample", tokenizer, "test")[:512]
    expected = math.exp(hand_mean_nll(hf_dynorm.load_model(tmp_path / "distill" / "final"), held_out, 512)
                        - hand_mean_nll(original, held_out, 512))
    assert summary["perplexity_ratio"] == pytest.approx(expected, rel=1e-4)
    record = json.loads((tmp_path / "distill" / "final" / "config.json").read_text())["dynorm"]
    assert record["norm"] == "dyisru" and record["distillation"]["mode"] == "lora"
    assert record["parameters"]["bound"] == "4.0 x token rms"
    assert all(site["anchors"] == 16 for site in record["sites"].values())
    assert record["sink"]["token_id"] == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert (tmp_path / "report.md").exists() and summary["generations"]["converted"]
    assert set(summary["phases_seconds"]) == {"training_loop", "around_the_loop", "checks"}
    assert all(seconds > 0 for seconds in summary["phases_seconds"].values())


def test_the_news_sample_is_another_domain_split_by_whole_articles(smollm2):
    from hf_dynorm.sources import load_texts

    every, train, test = (load_texts("news-sample", split) for split in ("all", "train", "test"))
    assert len(every) == 300 and train + test == every and len(test) == 30
    assert "bushfire" in every[0] and load_texts("news-sample", "all[:2]") == every[:2]


def test_pure_start_benchmark_profiles_each_start_and_agrees_with_the_embedding(smollm2, tmp_path):
    """benchmarks/pure_start.py with the original standing in for the homogenised model: each start with its
    copy gives the same ratio, and layer 0's profile is the embedding's rms, computed here independently."""
    import importlib.util

    model, tokenizer = smollm2
    homogenised = tmp_path / "homogenised"
    model.save_pretrained(homogenised)
    tokenizer.save_pretrained(homogenised)
    (homogenised / "homogenise.json").write_text("{}")
    spec = importlib.util.spec_from_file_location("pure_start", Path(__file__).parents[1] / "benchmarks" /
                                                  "pure_start.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    results = benchmark.main(["--homogenised", str(homogenised), "--windows", "1", "--calibration-windows", "2",
                              "--out", str(tmp_path / "out")])

    starts = results["starts"]
    assert math.isclose(starts["pure"]["perplexity_ratio"], starts["homogenised"]["perplexity_ratio"], rel_tol=1e-4)
    assert math.isclose(starts["pure + sink"]["perplexity_ratio"], starts["homogenised + sink"]["perplexity_ratio"],
                        rel_tol=1e-4)
    ids = full_windows(token_stream("wiki-sample", tokenizer, "test"), 512, 1)
    embedded = model.get_input_embeddings().weight[ids[:, 1:]].detach().float()
    layer0 = results["original"][0]
    assert layer0["median_rms"] == pytest.approx(embedded.square().mean(-1).sqrt().median().item(), rel=1e-5)
    assert layer0["massive_share"] == (embedded.abs().amax(-1) > 100).float().mean().item()
    assert json.loads((tmp_path / "out" / "pure_start.json").read_text())["sink_token"] == "<|endoftext|>"
    assert "| perplexity ratio | 1 |" in (tmp_path / "out" / "pure_start.md").read_text()

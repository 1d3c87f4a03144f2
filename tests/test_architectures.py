"""Every supported architecture, as a tiny random model: sites and roles, forward, gamma, save and reload."""

import collections
import json
import logging
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

import hf_dynorm
from hf_dynorm import DyISRU, DyT
from hf_dynorm.architectures import observing_norm_inputs
from hf_dynorm.conversion import save_converted
from tiny import ARCHITECTURES, ENCODERS, EXPECTED_ROLES, VOCAB, tiny_inputs, tiny_model


def auto_class(model_type):
    return AutoModelForMaskedLM if model_type in ENCODERS else AutoModelForCausalLM


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_registry_finds_exactly_the_expected_sites_and_roles(model_type):
    model = tiny_model(model_type)
    sites = hf_dynorm.find_norm_sites(model)
    assert dict(collections.Counter(site.role for site in sites)) == EXPECTED_ROLES[model_type]
    # no norm-like module is left out
    norm_like = {name for name, module in model.named_modules()
                 if isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")}
    assert norm_like == {site.name for site in sites}


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_observing_norm_inputs_skips_the_head_and_sees_what_a_full_forward_feeds_the_norms(model_type):
    model, ids = tiny_model(model_type), tiny_inputs()
    names = [site.name for site in hf_dynorm.find_norm_sites(model)]

    def observed(call):
        seen = {}
        observers = {n: lambda x, n=n: seen.setdefault(n, x) for n in names}
        with torch.no_grad(), observing_norm_inputs(model, observers) as run:
            call(run)
        return seen, run

    through_run, run = observed(lambda run: run(input_ids=ids))
    through_model, _ = observed(lambda _: model(input_ids=ids))
    assert through_run.keys() == through_model.keys() == set(names)
    assert all(torch.equal(through_run[n], through_model[n]) for n in names)
    # the base model where every site is in it; MLM heads hold a norm, so an encoder needs the whole model
    assert run is (model if model_type in ENCODERS else model.base_model) and model.base_model is not model
    # with_outputs: the same inputs, each with what its module made of it
    pairs = {}
    observers = {n: lambda x, y, n=n: pairs.setdefault(n, (x, y)) for n in names}
    with torch.no_grad(), observing_norm_inputs(model, observers, with_outputs=True) as run_with_outputs:
        run_with_outputs(input_ids=ids)
    assert all(torch.equal(pairs[n][0], through_run[n]) for n in names)
    assert all(torch.equal(pairs[n][1], model.get_submodule(n)(through_run[n])) for n in names)


@pytest.mark.parametrize("model_type", [m for m in ARCHITECTURES if m not in ENCODERS])
def test_observers_get_the_sequence_at_dim_1_at_every_site(model_type):
    """Causality says which axis is the sequence: a new last token changes every site's input at the last position
    alone. Gemma 3's q/k norms get (batch, heads, sequence, head_dim) and are handed over transposed; calibration
    and homogenisation leave out position 0 by this axis (it once dropped head 0, and with one KV head, everything)."""
    model, ids = tiny_model(model_type), tiny_inputs(batch=2, length=12)
    changed = ids.clone()
    changed[:, -1] = (ids[:, -1] - 2) % (VOCAB - 3) + 3  # the next id above the reserved 0-2, wrapping
    names = [site.name for site in hf_dynorm.find_norm_sites(model)]

    def observed(input_ids):
        seen = {}
        with torch.no_grad(), observing_norm_inputs(model, {n: lambda x, n=n: seen.setdefault(n, x)
                                                            for n in names}) as run:
            run(input_ids=input_ids)
        return seen

    before, after = observed(ids), observed(changed)
    for name in names:
        assert before[name].shape[:2] == (2, 12), name
        assert torch.equal(before[name][:, :-1], after[name][:, :-1]), name
        assert not torch.equal(before[name][:, -1], after[name][:, -1]), name


@pytest.mark.parametrize("model_type", ARCHITECTURES)
@pytest.mark.parametrize("norm", ["dyisru", "dyt"])
def test_convert_replaces_every_site_keeping_the_norm_weights(model_type, norm):
    model = tiny_model(model_type)
    sites = hf_dynorm.find_norm_sites(model)
    expected_gamma = {site.name: site.gamma(model.get_submodule(site.name)) for site in sites}
    biases = {site.name: getattr(model.get_submodule(site.name), "bias", None) for site in sites}
    hf_dynorm.convert(model, norm)
    kind = DyISRU if norm == "dyisru" else DyT
    for site in sites:
        module = model.get_submodule(site.name)
        assert isinstance(module, kind)
        torch.testing.assert_close(module.weight.detach(), expected_gamma[site.name])
        assert (module.bias is None) == (biases[site.name] is None)
    assert model.config.dynorm["norm"] == norm
    assert set(model.config.dynorm["sites"]) == {site.name for site in sites}
    assert model.config.model_type == f"dynorm_{model_type}"
    for dtype in (torch.float32, torch.bfloat16):
        logits = model.to(dtype)(tiny_inputs()).logits
        assert logits.dtype == dtype and torch.isfinite(logits).all()


@pytest.mark.parametrize("norm", ["dyisru", "dyt"])
def test_bound_keeps_the_slope_at_zero_and_caps_the_output(norm):
    reference, bounded = tiny_model("llama"), tiny_model("llama")
    value = {"kappa": 40.0} if norm == "dyisru" else {"alpha": 0.2}
    hf_dynorm.convert(reference, norm, **value)
    hf_dynorm.convert(bounded, norm, **value, bound=0.5)
    name = "model.layers.0.input_layernorm"
    paper, capped = reference.get_submodule(name), bounded.get_submodule(name)
    channels = paper.weight.numel()
    torch.testing.assert_close(capped.weight, paper.weight * 0.5 / math.sqrt(channels))
    small, huge = torch.full((1, channels), 1e-4), torch.full((1, channels), 1e6)
    paper.fused = capped.fused = False  # the exact forms: fused DyT's tanh is exact to 2e-7 absolute, not relative
    with torch.no_grad():
        torch.testing.assert_close(capped(small), paper(small), rtol=1e-4, atol=0.0)  # same slope at 0
        torch.testing.assert_close(capped(huge), capped.weight.expand(1, -1), rtol=1e-4, atol=0.0)  # bound 0.5 w
    assert bounded.config.dynorm["parameters"]["bound"] == "0.5 x token rms"


def test_bounded_anchored_dyisru_still_equals_the_norm_where_the_anchors_hold_the_energy(tmp_path):
    model = tiny_model("llama")
    name = "model.layers.0.input_layernorm"
    norm = model.get_submodule(name)
    hf_dynorm.convert(model, "dyisru", kappa=40.0, anchors=[3], bound=2.0)
    module = model.get_submodule(name)
    x = torch.randn(4, norm.weight.numel())
    x[:, 3] = 1e4  # a massive activation in the anchor channel: the token's energy is all there
    with torch.no_grad():
        torch.testing.assert_close(module(x), norm(x), rtol=1e-3, atol=1e-4)
    save_converted(model, tmp_path / "out")
    reloaded = hf_dynorm.load_model(tmp_path / "out").get_submodule(name)
    assert reloaded.anchor_scale == module.anchor_scale == pytest.approx(4.0 / norm.weight.numel())
    torch.testing.assert_close(reloaded(x), module(x))


def test_gemma_gamma_uses_one_plus_weight():
    model = tiny_model("gemma")
    original = model.model.layers[0].input_layernorm
    weight = original.weight.detach().clone()
    hf_dynorm.convert(model, "dyisru")
    torch.testing.assert_close(model.model.layers[0].input_layernorm.weight.detach(),
                               (1 + weight) * math.sqrt(weight.numel()))


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_save_and_reload_in_process_is_bit_identical(model_type, tmp_path):
    model = hf_dynorm.convert(tiny_model(model_type), "dyisru", anchors=[1, 4])
    inputs = tiny_inputs()
    with torch.no_grad():
        expected = model(inputs).logits
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == f"dynorm_{model_type}" and "dynorm" in config and "auto_map" in config
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "modeling_dynorm.py").exists()
    reloaded = auto_class(model_type).from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(inputs).logits, expected)
    base = AutoModel.from_pretrained(tmp_path)
    assert any(isinstance(m, DyISRU) for m in base.modules())
    assert not any(isinstance(m, torch.nn.LayerNorm) or type(m).__name__.endswith("RMSNorm")
                   for m in base.modules())


def test_save_keeps_dtype(tmp_path):
    model = hf_dynorm.convert(tiny_model("llama"), "dyt").to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    reloaded = hf_dynorm.load_model(tmp_path, dtype="auto")
    assert reloaded.model.layers[0].input_layernorm.alpha.dtype == torch.bfloat16
    inputs = tiny_inputs()
    with torch.no_grad():
        assert torch.equal(reloaded(inputs).logits, model(inputs).logits)


WITHOUT_HF_DYNORM = textwrap.dedent("""
    import json, sys
    sys.modules["hf_dynorm"] = None  # as if not installed
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM
    results = {}
    for model_type, folder, encoder in json.loads(sys.argv[1]):
        auto = AutoModelForMaskedLM if encoder else AutoModelForCausalLM
        try:
            auto.from_pretrained(folder)
            refused = None
        except Exception as error:
            refused = str(error)
        model = auto.from_pretrained(folder, trust_remote_code=True)
        with torch.no_grad():
            logits = model(torch.load(folder + "/inputs.pt")).logits
        results[model_type] = {"refused": refused, "class": type(model).__name__,
                               "identical": bool(torch.equal(logits, torch.load(folder + "/logits.pt")))}
    print("RESULTS " + json.dumps(results))
""")


@pytest.fixture(scope="module")
def reloaded_without_hf_dynorm(tmp_path_factory):
    """Convert and save every architecture, then reload them all in one subprocess where hf_dynorm is absent."""
    def save(model, folder):
        save_converted(model, folder, overwrite=True)

    jobs = _save_every_architecture(lambda model: hf_dynorm.convert(model, "dyisru", anchors=[0, 3]), save,
                                    tmp_path_factory.mktemp)
    return _reload_in_a_subprocess(WITHOUT_HF_DYNORM, jobs)


def _save_every_architecture(convert, save, new_folder) -> list:
    """Convert a tiny model of every architecture, save it with its inputs and logits: the jobs a reload script
    checks, (model_type, folder, is_encoder) each."""
    jobs = []
    for model_type in ARCHITECTURES:
        folder = new_folder(model_type)
        model = convert(tiny_model(model_type))
        save(model, folder)
        inputs = tiny_inputs()
        with torch.no_grad():
            torch.save(model(inputs).logits, folder / "logits.pt")
        torch.save(inputs, folder / "inputs.pt")
        jobs.append((model_type, str(folder), model_type in ENCODERS))
    return jobs


def _reload_in_a_subprocess(script: str, jobs: list) -> dict:
    run = subprocess.run([sys.executable, "-c", script, json.dumps(jobs)], capture_output=True,
                         text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.rpartition("RESULTS ")[2].splitlines()[0])


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_reload_without_hf_dynorm_needs_trust_remote_code_and_is_bit_identical(model_type,
                                                                                 reloaded_without_hf_dynorm):
    result = reloaded_without_hf_dynorm[model_type]
    assert result["refused"] and "trust_remote_code" in result["refused"]
    assert result["class"].startswith("Dynorm")
    assert result["identical"]


def test_unknown_architecture_falls_back_with_a_warning(caplog, tmp_path):
    from transformers import AutoConfig

    config = AutoConfig.for_model("starcoder2", vocab_size=96, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(config)
    with caplog.at_level(logging.WARNING):
        sites = hf_dynorm.find_norm_sites(model)
    assert "no registry entry for model_type 'starcoder2'" in caplog.text and "LayerNorm" in caplog.text
    assert len(sites) == 5
    hf_dynorm.convert(model, "dyisru")
    model.save_pretrained(tmp_path)
    inputs = tiny_inputs()
    with torch.no_grad():
        assert torch.equal(hf_dynorm.load_model(tmp_path)(inputs).logits, model(inputs).logits)


@pytest.mark.parametrize("norm", ["dyisru", "dyt"])
def test_torch_compile_of_a_converted_model_matches_eager(norm):
    """What `torch.compile(model)` makes of the fused Functions (anchored DyISRU included): same values and grads."""
    model = tiny_model("llama")
    hf_dynorm.convert(model, norm, **({"anchors": [1, 5]} if norm == "dyisru" else {}))
    ids = tiny_inputs()
    results = []
    for run in (model, torch.compile(model)):
        model.zero_grad()
        logits = run(ids).logits
        logits.square().mean().backward()
        site = model.get_submodule("model.layers.0.input_layernorm")
        results.append((logits.detach(), [p.grad.clone() for p in site.parameters()]))
    (eager, eager_grads), (compiled, compiled_grads) = results
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for compiled_grad, eager_grad in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-4, atol=1e-6)


WITH_A_FRESH_IMPORT = textwrap.dedent("""
    import json, sys
    import hf_dynorm  # first: neither torch nor transformers yet
    lazy = not any(name in sys.modules for name in ("torch", "transformers"))
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM
    results = {"lazy": lazy}
    for model_type, folder, masked in json.loads(sys.argv[1]):
        model = (AutoModelForMaskedLM if masked else AutoModelForCausalLM).from_pretrained(folder)
        with torch.no_grad():
            logits = model(torch.load(folder + "/inputs.pt")).logits
        bare = AutoModel.from_pretrained(folder)
        results[model_type] = {"class": type(model).__name__, "bare": type(bare).__name__,
                               "identical": bool(torch.equal(logits, torch.load(folder + "/logits.pt")))}
    print("RESULTS " + json.dumps(results))
""")


def test_a_fresh_import_is_lazy_and_still_loads_every_architecture_with_auto_classes(tmp_path):
    # `import hf_dynorm` imports no torch or transformers; the converted architectures register when transformers'
    # config mapping loads, and every saved checkpoint then loads bit-identically through the Auto classes
    jobs = _save_every_architecture(lambda model: hf_dynorm.convert(model, "dyt"),
                                    lambda model, folder: model.save_pretrained(folder), tmp_path.joinpath)
    results = _reload_in_a_subprocess(WITH_A_FRESH_IMPORT, jobs)
    assert results.pop("lazy") is True
    for model_type, found in results.items():
        assert found["identical"] and found["class"].startswith("Dynorm") and found["bare"].startswith("Dynorm"), \
            model_type

"""Share converted models: a model card built from the conversion record and measured results, and one Hub commit.

The folder that is uploaded is staged first (weights, config with `dynorm` and `auto_map`, `modeling_dynorm.py`,
tokenizer, README.md card, results and plots); `dry_run_dir` writes exactly that stage and sends nothing.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
import shutil
import tempfile
from pathlib import Path

from . import __version__
from .assets import EMBEDDED_HUB_IDS
from .downstream import task_label
from .fileio import atomic_directory, check_output_folder
from .modeling_dynorm import CODE_FILE

WEIGHT_SUFFIXES = (".safetensors",)
KNOWN_LICENSES = {"HuggingFaceTB/SmolLM2-135M-Instruct": "apache-2.0"}
NORM_TITLES = {"dyisru": "DyISRU (Dynamic Inverse Square Root Unit)", "dyt": "DyT (Dynamic Tanh)"}
NORM_SUMMARIES = {
    "dyisru": "DyISRU, `gamma * x / sqrt(kappa + x^2) + bias`, is the exact element-wise counterpart of RMSNorm "
              "(arXiv 2503.21708): it needs no reduction over channels.",
    "dyt": "DyT, `gamma * tanh(alpha * x) + bias` (arXiv 2503.10622), needs no reduction over channels.",
}


class PublishError(ValueError):
    """Nothing was uploaded."""


def model_fingerprint(folder) -> str:
    """sha256 over the weight files of a saved model: what ties results to the exact weights they measured."""
    digest = hashlib.sha256()
    files = sorted(p for p in Path(folder).iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        raise PublishError(f"{folder} holds no .safetensors weights")
    for path in files:
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def _record(folder: Path) -> dict:
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    if "dynorm" not in config or "auto_map" not in config or not (folder / CODE_FILE).exists():
        raise PublishError(f"{folder} is not a converted model folder (config.json needs a `dynorm` record and an "
                           f"`auto_map`, beside {CODE_FILE}); convert and save it with hf_dynorm first.")
    return config


def _evaluation(results: dict | None) -> dict | None:
    """The card's view of a results.json from `hf-dynorm eval` or from distillation."""
    if not results:
        return None
    if "student" in results:  # distillation's final/results.json
        student = results["student"]
        return {"perplexity": student["perplexity"], "reference_perplexity": results["teacher_perplexity"],
                "ratio": results["final_perplexity_ratio"], "tokens": student["tokens"],
                "data": results["config"]["data"], "worst_window_nll": student["window_nll_percentiles"]["p100"],
                "agreement": results.get("agreement"), "tasks": results.get("tasks")}
    model = results["model"]
    reference = results.get("reference") or {}
    return {"perplexity": model["perplexity"], "reference_perplexity": reference.get("perplexity"),
            "ratio": results.get("perplexity_ratio"), "tokens": model["tokens"], "data": results.get("data"),
            "worst_window_nll": model["window_nll_percentiles"]["p100"], "agreement": results.get("agreement"),
            "tasks": {task_label(task): scores for task, scores in (results.get("tasks") or {}).items()} or None}


def check_results(folder, results: dict | None) -> None:
    if results is None:
        return
    expected = model_fingerprint(folder)
    found = results.get("model_fingerprint")
    if found is None:
        raise PublishError("these results carry no model_fingerprint, so nothing ties them to this model; make them "
                           "with `hf-dynorm eval FOLDER` (or distillation) on the folder itself.")
    if found != expected:
        raise PublishError(f"these results belong to another model (fingerprint {found[:12]}..., this folder's is "
                           f"{expected[:12]}...); evaluate this folder with `hf-dynorm eval`.")


def render_card(folder, results: dict | None = None, *, repo_id: str | None = None, license: str | None = None,
                plots: list[str] = ()):
    """The model card of a converted folder, as a huggingface_hub ModelCard (not written anywhere)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    folder = Path(folder)
    config = _record(folder)
    record = config["dynorm"]
    base_model = record.get("base_model") or "unknown"
    base_model = EMBEDDED_HUB_IDS.get(base_model, base_model)
    model_name = repo_id or f"{base_model.rsplit('/', 1)[-1]}-{record['norm']}"
    evaluation = _evaluation(results)
    eval_results = None
    if evaluation:
        task = "fill-mask" if "MaskedLM" in str(config.get("architectures")) else "text-generation"
        metrics = [("perplexity", "Perplexity", evaluation["perplexity"])]
        if evaluation["reference_perplexity"]:
            metrics.append(("perplexity", "Perplexity of the base model", evaluation["reference_perplexity"]))
        if evaluation["ratio"]:
            metrics.append(("perplexity_ratio", "Perplexity ratio to the base model", evaluation["ratio"]))
        for kind, value in (evaluation.get("agreement") or {}).items():
            if kind in ("top1", "kl", "greedy") and value is not None:
                metrics.append((f"agreement_{kind}", f"Agreement with the base model ({kind})", value))
        eval_results = [EvalResult(task_type=task, dataset_type=str(evaluation["data"]),
                                   dataset_name=str(evaluation["data"]), metric_type=kind, metric_name=name,
                                   metric_value=float(value)) for kind, name, value in metrics]
        for name, scores in (evaluation.get("tasks") or {}).items():
            eval_results += [EvalResult(task_type=task, dataset_type=name, dataset_name=name, metric_type=metric,
                                        metric_name=f"{name} {metric}", metric_value=float(value))
                             for metric, value in scores["model"].items()]
    distillation = record.get("distillation")
    data_sources = {str(s) for s in ((record.get("calibration") or {}).get("data"), (distillation or {}).get("data"))
                    if s and "/" in str(s) and not Path(str(s)).exists()}
    card_data = ModelCardData(
        base_model=base_model if "/" in base_model else None, library_name="transformers",
        pipeline_tag="fill-mask" if "MaskedLM" in str(config.get("architectures")) else "text-generation",
        license=license or KNOWN_LICENSES.get(base_model, "other"),
        tags=["hf-dynorm", record["norm"], "normalization-free"], datasets=sorted(data_sources) or None,
        model_name=model_name, eval_results=eval_results)
    sites = record["sites"]
    roles = sorted({spec["role"] for spec in sites.values()})
    template = importlib.resources.files("hf_dynorm.model_cards").joinpath("template.md")
    return ModelCard.from_template(
        card_data, template_str=template.read_text(encoding="utf-8"), model_name=model_name,
        repo_id=repo_id or str(folder), base_model=base_model, version=record.get("hf_dynorm_version", __version__),
        norm=record["norm"], norm_title=NORM_TITLES[record["norm"]], norm_summary=NORM_SUMMARIES[record["norm"]],
        site_count=len(sites), roles=", ".join(roles), gamma_origin=record["parameters"]["gamma"],
        parameter_name="kappa" if record["norm"] == "dyisru" else "alpha",
        parameter_origin=record["parameters"].get("kappa") or record["parameters"].get("alpha"),
        bound=record["parameters"].get("bound"), form=record.get("form"),
        calibration=record.get("calibration"), distillation=_distillation_summary(distillation),
        evaluation=evaluation, plots=list(plots))


def _distillation_summary(distillation: dict | None) -> dict | None:
    return None if not distillation else {key: distillation.get(key) for key in
                                          ("mode", "schedule", "tokens", "data", "anchored_final")}


def write_card(folder, results: dict | None = None, **options) -> Path:
    """Render the card into FOLDER/README.md (results checked against the folder's weights first)."""
    check_results(folder, results)
    path = Path(folder) / "README.md"
    render_card(folder, results, **options).save(path)
    return path


def stage(folder, *, results_path=None, repo_id=None, license=None, tokenizer=None) -> Path:
    """A temporary folder holding exactly what would be uploaded."""
    folder = Path(folder)
    _record(folder)
    results = json.loads(Path(results_path).read_text()) if results_path else None
    check_results(folder, results)
    staged = Path(tempfile.mkdtemp(prefix="hf_dynorm_stage_"))
    for path in folder.iterdir():
        if path.is_file() and path.name != "README.md":
            shutil.copy2(path, staged / path.name)
    if tokenizer is not None:
        tokenizer.save_pretrained(staged)
    plots = []
    if results_path:
        shutil.copy2(results_path, staged / "results.json")
        for plot in sorted(Path(results_path).parent.glob("*.png")):
            shutil.copy2(plot, staged / plot.name)
            plots.append(plot.name)
    render_card(staged, results, repo_id=repo_id, license=license, plots=plots).save(staged / "README.md")
    return staged


def push_to_hub(model_or_folder, repo_id: str, *, tokenizer=None, results=None, private: bool | None = None,
                token: str | None = None, revision: str | None = None, commit_message: str | None = None,
                license: str | None = None, dry_run_dir=None, overwrite: bool = False) -> str:
    """Upload a converted model (object or saved folder) with its card, results and plots in one commit.

    Returns the commit URL, or the stage folder's path with `dry_run_dir` (nothing is sent then; a `dry_run_dir`
    that holds files is refused unless `overwrite`).
    """
    from huggingface_hub import CommitOperationAdd, HfApi, get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
        if "/" not in repo_id:
            raise HFValidationError("it needs a namespace")
    except HFValidationError as error:
        raise PublishError(f"repo id {repo_id!r} is malformed ({error}); use 'user-or-org/name'.") from None
    if dry_run_dir is not None:
        check_output_folder(dry_run_dir, overwrite)
    with tempfile.TemporaryDirectory() as scratch:
        folder = model_or_folder
        if not isinstance(model_or_folder, (str, os.PathLike)):
            from .conversion import save_converted

            folder = Path(scratch) / "model"
            save_converted(model_or_folder, folder, tokenizer)
            tokenizer = None
        staged = stage(folder, results_path=results, repo_id=repo_id, license=license, tokenizer=tokenizer)
    try:
        if dry_run_dir is not None:
            with atomic_directory(dry_run_dir, overwrite=overwrite) as tmp:
                shutil.copytree(staged, tmp, dirs_exist_ok=True)
            return str(dry_run_dir)
        token = token or get_token()
        if not token:
            raise PublishError("not logged in to the Hugging Face Hub: run `hf auth login` or pass token= "
                               "(--token); nothing was uploaded.")
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        operations = [CommitOperationAdd(path_in_repo=str(path.relative_to(staged)), path_or_fileobj=str(path))
                      for path in sorted(staged.rglob("*")) if path.is_file()]
        commit = api.create_commit(repo_id, operations, commit_message=commit_message or
                                   f"Upload {repo_id} converted with hf_dynorm {__version__}", revision=revision)
        return str(getattr(commit, "commit_url", commit))
    finally:
        shutil.rmtree(staged, ignore_errors=True)

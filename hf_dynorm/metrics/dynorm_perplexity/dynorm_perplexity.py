"""Strided perplexity of a model object on texts (hf_dynorm.evaluation), as an `evaluate` metric."""

import datasets
import evaluate

from hf_dynorm.evaluation import compare, perplexity

_DESCRIPTION = "Strided sliding-window perplexity of a (converted) model object, with NLL percentiles."
_KWARGS = """
Args:
    predictions (list of str): the texts to score.
    model: a transformers causal LM object. tokenizer: its tokenizer.
    reference (optional): the original model, scored on the very same tokens.
    window (int, 512), stride (int, window), batch_size (int, 4).
Returns: perplexity, mean_nll, tokens, and perplexity_ratio with a reference.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class DynormPerplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
                                   features=datasets.Features({"predictions": datasets.Value("string")}))

    def _compute(self, predictions, model, tokenizer, reference=None, window=512, stride=None, batch_size=4):
        options = dict(tokenizer=tokenizer, window=window, stride=stride, batch_size=batch_size, progress=False)
        if reference is None:
            result = perplexity(model, list(predictions), **options)
            return {"perplexity": result.perplexity, "mean_nll": result.mean_nll, "tokens": result.tokens}
        both = compare(model, reference, list(predictions), **options)
        return {"perplexity": both["model"]["perplexity"], "mean_nll": both["model"]["mean_nll"],
                "tokens": both["model"]["tokens"], "reference_perplexity": both["reference"]["perplexity"],
                "perplexity_ratio": both["perplexity_ratio"]}

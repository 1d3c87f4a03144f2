"""Outlier fidelity of a converted model against its original (hf_dynorm.fidelity), as an `evaluate` metric."""

import datasets
import evaluate

from hf_dynorm.data import tokenize
from hf_dynorm.fidelity import outlier_fidelity

_DESCRIPTION = "How well a converted model's element-wise norms reproduce the original norms on real activations."
_KWARGS = """
Args:
    predictions (list of str): the texts whose activations are compared.
    model: the converted model. reference: its original. tokenizer: their tokenizer.
    window (int, 512), element_k (float, 4), token_m (float, 4).
Returns: relative L2 errors (all, outlier elements, outlier tokens, saturated), sign and top-k agreement,
averaged over sites, and the same per role.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class DynormFidelity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
                                   features=datasets.Features({"predictions": datasets.Value("string")}))

    def _compute(self, predictions, model, reference, tokenizer, window=512, element_k=4.0, token_m=4.0):
        results = outlier_fidelity(model, tokenize(list(predictions), tokenizer), reference=reference,
                                   window=window, element_k=element_k, token_m=token_m, progress=False)
        sites = [site["converted"] for site in results["sites"].values()]
        summary = {key: sum(s[key] for s in sites if s[key] is not None) / max(1, sum(s[key] is not None
                                                                                     for s in sites))
                   for key in sites[0]}
        return {**summary, "by_role": {role: m["converted"] for role, m in results["by_role"].items()}}

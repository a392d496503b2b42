"""``evaluate`` packaging of :func:`hf_attn_swap.eval.perplexity.perplexity`, loadable offline.

The Hub's ``evaluate.load("perplexity")`` needs the Hub (unreachable here) and scores disjoint windows with a model
id. This local module wraps the project's strided perplexity instead::

    import evaluate
    from hf_attn_swap.eval.strided_perplexity import METRIC_PATH
    metric = evaluate.load(METRIC_PATH)
    metric.compute(predictions=[text], model=model, tokenizer=tok, context=512, stride=256)

Returns ``token_perplexity``, ``bits_per_byte``, ``word_perplexity`` (over all texts together: NLL, tokens, bytes and
words summed), ``perplexities`` (per text), ``n_tokens``, ``normalisation``.
"""

import math

import datasets
import evaluate

METRIC_PATH = __file__

_DESCRIPTION = "Strided sliding-window perplexity (token-level, bits per byte, word-level) of a loaded causal LM."
_KWARGS = """
Args:
    predictions: texts to score (each evaluated on its own; totals sum NLL, tokens, bytes and words).
    model: a loaded causal LM (any attention).
    tokenizer: its tokenizer.
    context: window length (default 512). stride: new tokens per window (default: context).
    batch_size: windows per forward (default 4). max_tokens: tokens per text (default: all).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class StridedPerplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(self, predictions, model=None, tokenizer=None, context=512, stride=None, batch_size=4, max_tokens=None):
        from hf_attn_swap.eval.perplexity import NORMALISATION, perplexity_of_text

        if model is None or tokenizer is None:
            raise ValueError("strided_perplexity needs model= and tokenizer= (a loaded causal LM and its tokenizer)")
        results = [
            perplexity_of_text(model, tokenizer, text, max_tokens=max_tokens, context=context, stride=stride,
                               batch_size=batch_size)
            for text in predictions
        ]
        nll = sum(r.nll_sum for r in results)
        tokens = sum(r.n_tokens for r in results)
        n_bytes = sum(r.n_bytes for r in results)
        words = sum(r.n_words for r in results)
        return {
            "token_perplexity": math.exp(nll / tokens),
            "bits_per_byte": nll / (math.log(2) * n_bytes),
            "word_perplexity": math.exp(nll / words) if nll / words < 700 else math.inf,
            "perplexities": [r.token_ppl for r in results],
            "n_tokens": tokens,
            "normalisation": NORMALISATION,
        }

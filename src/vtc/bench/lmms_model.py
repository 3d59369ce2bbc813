"""The lmms-eval model class behind ``--model vtc`` (imported by lmms-eval only; see ``lmms.py`` for the options).

A "simple" lmms-eval model: each request carries the prompt context, the generation kwargs,
and a function that returns the document's images.
"""

from __future__ import annotations

from lmms_eval import utils
from lmms_eval.api.model import lmms

from .lmms import answer_requests, bridge_options, load_pipeline, merge_model_args


class VtcLmms(lmms):
    is_simple = True

    def __init__(self, **model_args):
        super().__init__()
        self.options = bridge_options(**model_args)
        self.pipe = load_pipeline(self.options)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "VtcLmms":
        """``--model_args`` and lmms-eval's own flags merged (a batch_size in --model_args wins over the default)."""
        return cls(**merge_model_args(utils.simple_parse_args_string(arg_string), additional_config or {}))

    @property
    def batch_size(self) -> int:
        return self.options.batch_size

    def generate_until(self, requests) -> list[str]:
        from tqdm import tqdm

        items = []
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            items.append((context, gen_kwargs, lambda doc=doc, visual=doc_to_visual: visual(doc)))
        with tqdm(total=len(items), disable=self.rank != 0, desc="vtc") as bar:
            return answer_requests(self.pipe, self.options, items, on_batch=bar.update)

    def loglikelihood(self, requests):
        raise NotImplementedError("vtc's bridge generates answers; log-likelihood tasks are not supported")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("multi-round generation is not supported by vtc's bridge")

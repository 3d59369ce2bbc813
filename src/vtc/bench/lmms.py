"""lmms-eval bridge (optional extra ``vtc[lmms]``): evaluate any vtc method with lmms-eval's tasks.

    pip install "visual-token-compression[lmms]"
    python -m lmms_eval --model vtc --model_args pretrained=PATH,clip=PATH,method=recoverable,budget=auto --tasks gqa

lmms-eval is imported only when the bridge is registered (``register()``), so vtc works
without it. The wrapper is a "simple" lmms-eval model: each request carries the prompt
context, generation kwargs, and a function that returns the document's images.
"""

from __future__ import annotations

from typing import Any, Iterable

from ..methods.base import VTCError


def answer_requests(pipe, method: str, budget: str, items: Iterable[tuple[str, dict, list]], **method_options: Any) -> list[str]:
    """(context, gen_kwargs, images) per request -> generated answers, one image per prompt."""
    answers = []
    for context, gen_kwargs, images in items:
        if len(images) != 1:
            raise VTCError(f"vtc's LLaVA-1.5 adapter answers prompts with exactly one image, got {len(images)}")
        max_new = int((gen_kwargs or {}).get("max_new_tokens", 32))
        [result] = pipe([images[0]], [context], method=method, budget=budget, max_new_tokens=max_new, **method_options)
        answers.append(result.text)
    return answers


def register():
    """Register the ``vtc`` model with lmms-eval; raises a clear error when lmms-eval is not installed."""
    try:
        from lmms_eval.api.model import lmms
        from lmms_eval.api.registry import register_model
    except ImportError:
        raise VTCError('the lmms-eval bridge needs lmms-eval: pip install "visual-token-compression[lmms]"') from None

    @register_model("vtc")
    class VtcLmms(lmms):
        def __init__(self, pretrained: str, clip: str | None = None, method: str = "recoverable", budget: str = "auto",
                     text_source: str = "clip", **kwargs):
            super().__init__()
            from ..pipeline import Pipeline

            self.pipe = Pipeline.from_pretrained(pretrained, clip=clip, text_source=text_source)
            self.method, self.budget = method, budget

        def generate_until(self, requests) -> list[str]:
            items = []
            for request in requests:
                context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
                items.append((context, gen_kwargs, doc_to_visual(self.task_dict[task][split][doc_id])))
            return answer_requests(self.pipe, self.method, self.budget, items)

        def loglikelihood(self, requests):
            raise NotImplementedError("vtc's bridge generates answers; log-likelihood tasks are not supported")

        def generate_until_multi_round(self, requests):
            raise NotImplementedError("multi-round generation is not supported by vtc's bridge")

    return VtcLmms

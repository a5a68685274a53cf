"""The second stage over a frozen LG-VQ tokenizer: a small decoder-only transformer over its codes.

One model (``CodeTransformer``, taming's cond-transformer idea written for this project) serves two tasks:

* ``caption``: the image's code indices are the prefix, the caption's tokens are generated;
* ``t2i`` (text to image): the caption's tokens are the prefix, the image's code indices are generated and
  the tokenizer's decoder turns them into pixels.

``tasks`` turns a batch (codes ``[B, h, w]`` from ``LGVQ.encode``, a ``TextBatch`` from the text encoder's
tokenizer) into the model's (prefix, target) for each task and the generated tokens back into captions or
``[B, h, w]`` codes; ``sampling`` holds the token choice (greedy, temperature, top-k, top-p).
"""
from lgvq_fast.downstream.model import TASKS, CodeTransformer, CodeTransformerConfig, KVCache
from lgvq_fast.downstream.tasks import (TaskBatch, TextVocab, codes_to_tokens, config_for, decode_captions,
                                        generate_captions, generate_codes, make_batch, tokens_to_codes)

__all__ = ["TASKS", "CodeTransformer", "CodeTransformerConfig", "KVCache", "TaskBatch", "make_batch",
           "codes_to_tokens", "tokens_to_codes", "decode_captions", "generate_captions", "generate_codes",
           "config_for", "TextVocab"]

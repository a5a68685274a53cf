"""What a downstream run reads and writes besides its loop: the frozen tokenizer, the checkpoint's contents and the
checks that a checkpoint, a tokenizer and a caption fit together (each failure one line naming the culprit)."""
import torch

from lgvq_fast.errors import ConfigError


def load_tokenizer(path, device):
    """(LGVQ model in eval mode with every parameter frozen, its text encoder, its config dict, its identity) of
    the tokenizer checkpoint ``path`` (one ``lgvq_fast/train.py`` wrote)."""
    from lgvq_fast.downstream.codes import tokenizer_identity
    from lgvq_fast.eval import load_checkpoint_model

    model, text_encoder, cfg = load_checkpoint_model(path, device)
    model.requires_grad_(False)
    text_encoder.requires_grad_(False)
    return model.eval(), text_encoder, cfg, tokenizer_identity(path)


def check_same_tokenizer(saved, identity, what):
    """ConfigError when the tokenizer ``identity`` (``codes.tokenizer_identity``) is not the one ``what`` (a
    checkpoint path) recorded as ``saved``."""
    if saved is None:
        raise ConfigError(f"{what} records no tokenizer: not a downstream checkpoint")
    if saved.get("checksum") != identity.get("checksum"):
        raise ConfigError(f"tokenizer {identity.get('path')} (checksum {str(identity.get('checksum'))[:12]}...) is "
                          f"not the one {what} was trained over ({saved.get('path')}, checksum "
                          f"{str(saved.get('checksum'))[:12]}...): pass that checkpoint with --tokenizer")


def caption_vocabulary(cache, text_encoder):
    """Sorted text token ids of the real (unpadded) captions of a code cache, plus the text encoder's padding and
    end ids (what a caption model must be able to emit)."""
    ids = torch.from_numpy(cache.text_ids[:].astype("int64"))
    mask = torch.from_numpy(cache.text_mask[:].astype(bool))
    special = {text_encoder.pad_token_id, text_encoder.eos_token_id}
    return sorted(set(ids[mask].unique().tolist()) | {int(i) for i in special if i is not None})


def text_vocab(vocabulary, text_encoder):
    """The ``TextVocab`` of a downstream model whose training captions used ``vocabulary``."""
    from lgvq_fast.downstream.tasks import TextVocab

    unk = getattr(text_encoder.tokenizer, "unk_token_id", None)
    return TextVocab(vocabulary, unk if unk is not None else text_encoder.pad_token_id)


def unknown_words(captions, vocabulary, text_encoder):
    """The words of ``captions`` (strings) that the text encoder's tokenizer turns into at least one token id
    outside ``vocabulary`` (the training captions' token ids), in order of first appearance."""
    known, bad = set(vocabulary), []
    for caption in captions:
        for word in caption.split():
            ids = text_encoder.tokenizer(word, add_special_tokens=False)["input_ids"]
            if any(i not in known for i in ids) and word not in bad:
                bad.append(word)
    return bad


def check_captions(captions, text_encoder, vocabulary, max_tokens):
    """The TextBatch of ``captions`` (strings) for a t2i model whose training captions used ``vocabulary``;
    ValueError naming the caption that is empty, too long or uses words the model never saw."""
    if isinstance(captions, str) or not captions:
        raise ValueError("give at least one caption (--caption TEXT)")
    for c in captions:
        if not isinstance(c, str) or not c.strip():
            raise ValueError(f"caption {c!r} is empty")
        n = len(text_encoder.tokenizer(c.strip().lower())["input_ids"])
        if n > max_tokens:
            raise ValueError(f"caption {c!r} is {n} tokens long with its start and end tokens; this model reads "
                             f"at most {max_tokens}")
    captions = [c.strip().lower() for c in captions]
    bad = unknown_words(captions, vocabulary, text_encoder)
    if bad:
        raise ValueError(f"caption word(s) {', '.join(repr(w) for w in bad)} never appear in this model's training "
                         f"captions; it knows {len(vocabulary)} tokens, e.g. "
                         + ", ".join(text_encoder.tokenizer.convert_ids_to_tokens(vocabulary[:40])))
    return text_encoder.tokenize(captions, max_tokens)


def load_downstream(path, device):
    """(CodeTransformer in eval mode, checkpoint state) of a downstream checkpoint; ValueError naming ``path``
    when it is not one."""
    from lgvq_fast.downstream.config import DownstreamConfig
    from lgvq_fast.downstream.model import CodeTransformer, CodeTransformerConfig
    from lgvq_fast.training.checkpoint import CheckpointIO

    state = CheckpointIO.load(path, "cpu")
    cfg = state.get("config")
    if not isinstance(cfg, dict) or "tokenizer" not in state or "task" not in cfg.get("train", {}):
        raise ValueError(f"{path} is not a downstream checkpoint (lgvq_fast/downstream/train.py writes them, with "
                         "its config and tokenizer): a tokenizer checkpoint goes to --tokenizer")
    try:
        DownstreamConfig.from_dict(cfg)
        model = CodeTransformer(CodeTransformerConfig.from_dict(cfg["model"]))
        model.load_state_dict(state["model"])
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ValueError(f"{path}: its weights do not fit its own config: {' '.join(str(exc).split())[:300]}") \
            from exc
    return model.to(device).eval(), state

"""Tiny local stand-ins for the files the paper setup needs: a CLIP folder (text and image towers, a byte-level
BPE tokenizer over a few letters) and an LPIPS weights file of the right layout with random values."""
import string

import torch


def make_tiny_clip(folder):
    """Write a tiny CLIP model and tokenizer to ``folder`` (the layout of a downloaded ViT-B/32); returns it."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    chars = list(string.ascii_lowercase) + [".", ","]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges = [("r", "e"), ("c", "i"), ("ci", "r")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    text_cfg = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, max_position_embeddings=40, bos_token_id=tok.bos_token_id,
                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision_cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      image_size=32, patch_size=16)
    torch.manual_seed(0)
    full = CLIPModel(CLIPConfig(text_config=text_cfg, vision_config=vision_cfg, projection_dim=32)).eval()
    full.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def make_tiny_lpips(path):
    """Write an LPIPS weights file (VGG16 features + the five heads, random values) to ``path``; returns it."""
    from safetensors.torch import save_file

    from lgvq_fast.models.perceptual import PerceptualLoss

    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in PerceptualLoss().state_dict().items() if k.startswith(("vgg.", "lin"))}
    save_file(state, str(path))
    return path

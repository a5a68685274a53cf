"""Captions shared by the text-encoder and LG-VQ model tests."""

CAPTIONS = ["a large red circle left of a small blue square", "two shapes", "a tiny green star above a purple cross .",
            "a big yellow triangle , right of an orange ellipse", "a small white diamond below a black circle"]

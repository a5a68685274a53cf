"""LPIPS-style perceptual loss: VGG16 features + the five LPIPS linear heads, built in code.

Nothing is downloaded. The weights come from one local file (``.safetensors`` or a ``torch.save`` state
dict) holding both parts under these keys:

* ``vgg.features.{i}.weight`` / ``vgg.features.{i}.bias`` for the conv layers ``i`` in 0..28 of
  torchvision's ``vgg16().features`` (the same indices as torchvision's own state dict);
* ``lin{k}.weight`` for k = 0..4, shape ``[1, C_k, 1, 1]`` (C = 64, 128, 256, 512, 512), the LPIPS v0.1
  "vgg" heads (``lin{k}.model.1.weight`` in the ``lpips`` package's ``weights/v0.1/vgg.pth`` and in
  taming-transformers' ``taming/modules/autoencoder/lpips/vgg.pth``).

Making the file once, on a machine that has the two sources::

    import torch, torchvision
    from safetensors.torch import save_file
    vgg = torchvision.models.vgg16(weights=torchvision.models.VGG16_Weights.IMAGENET1K_V1)
    sd = {f"vgg.{k}": v for k, v in vgg.state_dict().items()
          if k.startswith("features.") and int(k.split(".")[1]) < 30}
    lin = torch.load("vgg.pth", map_location="cpu")  # the LPIPS v0.1 vgg heads
    sd.update({f"lin{k}.weight": lin[f"lin{k}.model.1.weight"] for k in range(5)})
    save_file({k: v.contiguous() for k, v in sd.items()}, "lpips_vgg16.safetensors")

then pass ``lpips_path="lpips_vgg16.safetensors"``. Unlike the official code the net always stays in eval
mode (the LPIPS heads' dropout is never switched on by ``.train()``, spec §8 B17).
"""
import os

import torch
import torch.nn as nn

# torchvision vgg16 ``features`` conv layout up to relu5_3: (index, in, out); ReLU after each conv,
# max-pool at 4, 9, 16, 23
_VGG_CONVS = ((0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256), (12, 256, 256),
              (14, 256, 256), (17, 256, 512), (19, 512, 512), (21, 512, 512), (24, 512, 512),
              (26, 512, 512), (28, 512, 512))
_POOLS = (4, 9, 16, 23)
# exclusive ends of the five LPIPS slices (after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3)
_SLICE_ENDS = (4, 9, 16, 23, 30)
_LIN_CHANNELS = (64, 128, 256, 512, 512)


def _vgg16_features() -> nn.Sequential:
    convs = {i: (cin, cout) for i, cin, cout in _VGG_CONVS}
    layers = []
    for i in range(30):
        if i in convs:
            layers.append(nn.Conv2d(*convs[i], kernel_size=3, padding=1))
        elif i in _POOLS:
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers.append(nn.ReLU(inplace=False))
    return nn.Sequential(*layers)


def _load_state_dict(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


class PerceptualLoss(nn.Module):
    """LPIPS(x, y) per image, [B, 1, 1, 1], for images in [-1, 1]. Frozen, always in eval mode.

    ``impl``: "auto" (default) computes each layer's distance with the fused ``lgvq_fast.ops.lpips_distance``
    on CUDA (one read of the features each way, fp32 arithmetic) and with LPIPS' PyTorch formulation
    elsewhere; "native" always uses the PyTorch formulation; "triton" also runs the fused op on CPU tensors
    under TRITON_INTERPRET=1 (tests).
    """

    impl = "auto"

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.vgg = nn.Module()
        self.vgg.features = _vgg16_features()
        for k, c in enumerate(_LIN_CHANNELS):
            setattr(self, f"lin{k}", nn.Conv2d(c, 1, 1, bias=False))
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_checkpoint(cls, path: str) -> "PerceptualLoss":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"perceptual-loss checkpoint not found: {path!r} (see lgvq_fast.models.perceptual)")
        state = _load_state_dict(path)
        # built on the meta device: the random init of 14.7 M VGG weights would be thrown away
        with torch.device("meta"):
            net = cls()
        missing, unexpected = net.load_state_dict(state, strict=False, assign=True)
        if missing or unexpected:
            raise ValueError(
                f"perceptual-loss checkpoint {path!r} does not match the VGG16+LPIPS layout: "
                f"missing keys {missing[:6]}, unexpected keys {unexpected[:6]}")
        net.shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
        net.scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
        return net.float().requires_grad_(False).eval()

    def train(self, mode: bool = True):
        return super().train(False)

    def _features(self, x):
        feats = []
        h = (x - self.shift) / self.scale
        start = 0
        for end in _SLICE_ENDS:
            for i in range(start, end):
                h = self.vgg.features[i](h)
            feats.append(h)
            start = end
        return feats

    def _fused(self, f):
        if self.impl == "native" or torch.compiler.is_compiling():
            return False
        from lgvq_fast._backend import triton_available, triton_interpret

        if not triton_available():
            return False
        return f.is_cuda or (self.impl == "triton" and f.device.type == "cpu" and triton_interpret())

    def forward(self, x, y):
        # one VGG pass per batch, as LPIPS does: x (the real images) needs no gradient, so its pass records no
        # graph, where one pass over cat([x, y]) would run the VGG's backward over x's half too
        fx, fy = self._features(x), self._features(y)
        total = 0.0
        for k, (a, b) in enumerate(zip(fx, fy)):
            lin = getattr(self, f"lin{k}")
            if self._fused(b):
                from lgvq_fast.ops.lpips import lpips_distance

                total = total + lpips_distance(a, b, lin.weight, eps=1e-10, impl="triton").view(-1, 1, 1, 1)
                continue
            a = a / (a.square().sum(dim=1, keepdim=True).sqrt() + 1e-10)
            b = b / (b.square().sum(dim=1, keepdim=True).sqrt() + 1e-10)
            total = total + lin((a - b).square()).mean(dim=(2, 3), keepdim=True)
        return total

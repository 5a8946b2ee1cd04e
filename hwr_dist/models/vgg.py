"""VGG (torchvision variants) for fine-tuning on small grayscale images.

* One input channel, no tripled data: the first convolution is a `GrayConv` that holds the
  pretrained RGB kernel folded onto a gray image, ImageNet normalisation and the data set's
  own normalisation included, so that for a normalised batch `x`

      GrayConv(x) == conv_rgb(imagenet_normalise(repeat(x * std + mean, 3)))

  exactly (up to float rounding), borders included: zero padding in the RGB/ImageNet space is
  not zero in ours, which a constant "border map" (the offset kernel convolved with ones) fixes.
* The batch is resized to `input_size` on the device inside the model (VGG pools five times).
* Freezing by blocks (the five conv stages between max-pools); frozen blocks keep their
  batch-norm statistics (eval mode) so that their output is a fixed function of the input.
* `embed(x)` (backbone) and `classify(f)` (head) split the model where features are cheapest
  to cache; `forward(f, from_features=True)` runs the head alone (through DDP, so gradients
  are still all-reduced).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hwr_dist.errors import HwrError

# torchvision's layer plans (vgg.cfgs): numbers are conv widths, "M" a 2x2 max-pool.
_PLANS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"],
}
VARIANTS = sorted([*_PLANS, *(f"{v}_bn" for v in _PLANS)])
HEADS = ("linear", "mlp", "vgg")
BLOCKS = 5
MIN_INPUT = 32
FEATURES = 512
MLP_HIDDEN = 512
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class GrayConv(nn.Module):
    """3x3 conv (padding 1) on one normalised gray channel, parametrised in [0, 1] pixel units.

    weight: the kernel on pixels in [0, 1]; offset: a kernel on a constant-one image, which
    carries what the RGB model's normalisation subtracted; data_mean/data_std: the data set's
    normalisation of the incoming batch (set by the training loop, saved with the model).
    """

    def __init__(self, out_channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, 1, 3, 3))
        self.offset = nn.Parameter(torch.zeros(out_channels, 1, 3, 3))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.register_buffer("data_mean", torch.tensor(0.0))
        self.register_buffer("data_std", torch.tensor(1.0))
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")

    @classmethod
    def fold(cls, rgb_weight: torch.Tensor, rgb_bias: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> "GrayConv":
        """From a conv on (rgb - mean) / std: a gray pixel p is (p, p, p), so the three channel
        kernels add up, each divided by its std; the means become the offset kernel."""
        conv = cls(rgb_weight.shape[0])
        m = torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)
        s = torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
        w = rgb_weight.double()
        with torch.no_grad():
            conv.weight.copy_((w / s).sum(1, keepdim=True))
            conv.offset.copy_(-(w * m / s).sum(1, keepdim=True))
            conv.bias.copy_(rgb_bias)
        return conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # pixels = x * std + mean; conv(pixels) = conv(x, std * W) + conv(1, mean * W) over the
        # valid (unpadded) taps only, hence the border map from a ones image with zero padding.
        ones = torch.ones((1, 1, *x.shape[-2:]), dtype=x.dtype, device=x.device)
        border = F.conv2d(ones, (self.offset + self.data_mean * self.weight).to(x.dtype), padding=1)
        return F.conv2d(x, (self.data_std * self.weight).to(x.dtype), self.bias.to(x.dtype), padding=1) + border


def make_features(variant: str) -> tuple[nn.Sequential, list[range]]:
    """torchvision's `features` (same indices, so its state dicts load) with a GrayConv first;
    and the index range of each of the five blocks (conv stage + its max-pool)."""
    plan, bn = _PLANS[variant.removesuffix("_bn")], variant.endswith("_bn")
    layers: list[nn.Module] = []
    blocks: list[range] = []
    start, cin = 0, 1
    for v in plan:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
            blocks.append(range(start, len(layers)))
            start = len(layers)
            continue
        conv = GrayConv(v) if cin == 1 else nn.Conv2d(cin, v, 3, padding=1)
        if isinstance(conv, nn.Conv2d):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        layers += [conv, nn.BatchNorm2d(v), nn.ReLU(inplace=True)] if bn else [conv, nn.ReLU(inplace=True)]
        cin = v
    return nn.Sequential(*layers), blocks


class FeatureNorm(nn.BatchNorm1d):
    """Per-feature standardisation (batch norm without affine): deep features of another task come
    at very different scales, which a linear probe on them cannot undo (on the Fashion-MNIST ->
    MNIST pair: 65% -> 85% validation accuracy). A fixed affine map at inference."""

    def __init__(self, features: int):
        super().__init__(features, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] == 1:  # a last batch of one: batch statistics are undefined
            return F.batch_norm(x, self.running_mean, self.running_var, training=False, eps=self.eps)
        return super().forward(x)


class Head(nn.Module):
    """pool -> flatten -> classifier. `linear`: global average pool, feature standardisation and
    one linear layer; `mlp`: the same with a hidden layer; `vgg`: torchvision's 7x7 pool and
    classifier (a new last layer)."""

    def __init__(self, kind: str, num_classes: int, dropout: float):
        super().__init__()
        self.kind = kind
        if kind == "vgg":
            self.pool = nn.AdaptiveAvgPool2d((7, 7))
            self.classifier = nn.Sequential(
                nn.Linear(FEATURES * 49, 4096), nn.ReLU(True), nn.Dropout(dropout),
                nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(dropout),
                nn.Linear(4096, num_classes))
        else:
            self.pool = nn.AdaptiveAvgPool2d(1)
            if kind == "linear":
                self.classifier = nn.Sequential(FeatureNorm(FEATURES), nn.Linear(FEATURES, num_classes))
            else:
                self.classifier = nn.Sequential(FeatureNorm(FEATURES), nn.Linear(FEATURES, MLP_HIDDEN), nn.ReLU(True),
                                                nn.Dropout(dropout), nn.Linear(MLP_HIDDEN, num_classes))
        for m in self.classifier:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    @property
    def pooled_side(self) -> int:
        return 7 if self.kind == "vgg" else 1


class VGG(nn.Module):
    def __init__(self, variant: str, num_classes: int, input_size: int = 32, head: str = "linear",
                 dropout: float = 0.5, frozen_blocks: int = 0, unfreeze_after_epochs: int = 0,
                 backbone_lr_scale: float = 1.0):
        super().__init__()
        if variant not in VARIANTS:
            raise HwrError(f"unknown VGG variant '{variant}'; choose one of {', '.join(VARIANTS)}")
        if input_size < MIN_INPUT:
            raise HwrError(f"model.input_size={input_size} is too small: VGG halves the image five times; "
                           f"use {MIN_INPUT} or more")
        self.variant, self.input_size = variant, input_size
        self.features, self.blocks = make_features(variant)
        self.head = Head(head, num_classes, dropout)
        # cache the smaller of the backbone output and the pooled features
        self.pool_in_embed = self.head.pooled_side <= input_size // 32
        self.unfreeze_after_epochs = unfreeze_after_epochs
        self.backbone_lr_scale = backbone_lr_scale
        self.frozen_blocks = 0
        self.weights_note = ""  # what loading the weights did, for the run's log
        self.set_frozen(frozen_blocks)

    # --- inputs ---------------------------------------------------------------------
    def set_input_norm(self, mean: float, std: float) -> None:
        """The (mean, std) the incoming batches were normalised with, in [0, 1] pixel units."""
        conv = self.features[0]
        conv.data_mean.fill_(mean)
        conv.data_std.fill_(std)

    def resize(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) == (self.input_size, self.input_size):
            return x
        return F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)

    # --- forward ----------------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images [B, 1, H, W] -> what the feature cache holds."""
        f = self.features(self.resize(x))
        return self.head.pool(f) if self.pool_in_embed else f

    def classify(self, f: torch.Tensor) -> torch.Tensor:
        if not self.pool_in_embed:
            f = self.head.pool(f)
        return self.head.classifier(torch.flatten(f, 1))

    def forward(self, x: torch.Tensor, from_features: bool = False) -> torch.Tensor:
        return self.classify(x if from_features else self.embed(x))

    # --- freezing ---------------------------------------------------------------------
    def set_frozen(self, frozen_blocks: int) -> None:
        """Freeze the first `frozen_blocks` of the five blocks (requires_grad off, BN in eval)."""
        self.frozen_blocks = frozen_blocks
        for b, block in enumerate(self.blocks):
            for i in block:
                for p in self.features[i].parameters():
                    p.requires_grad_(b >= frozen_blocks)
        self.train(self.training)

    def train(self, mode: bool = True) -> "VGG":
        super().train(mode)
        for block in self.blocks[: self.frozen_blocks]:
            for i in block:
                self.features[i].eval()
        return self

    @property
    def backbone_frozen(self) -> bool:
        return self.frozen_blocks == BLOCKS

    def on_epoch_start(self, epoch: int) -> bool:
        """Gradual unfreezing: from epoch `unfreeze_after_epochs` on, everything trains.
        Returns whether the trainable parameters changed (DDP must then be rebuilt)."""
        if self.unfreeze_after_epochs and epoch >= self.unfreeze_after_epochs and self.frozen_blocks:
            self.set_frozen(0)
            return True
        return False

    def frozen_at(self, epoch: int) -> bool:
        """Whether the whole backbone is still frozen during `epoch` (so cached features hold)."""
        return self.backbone_frozen and not (self.unfreeze_after_epochs and epoch >= self.unfreeze_after_epochs)

    def param_groups(self):
        """Every parameter, frozen or not (unfreezing and optimizer resume need them all)."""
        return [("backbone", self.backbone_lr_scale, list(self.features.named_parameters())),
                ("head", 1.0, list(self.head.named_parameters()))]

    def backbone_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("head.")}

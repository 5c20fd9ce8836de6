"""LossNet (M2SNet, Zhao et al., 2023): a frozen VGG-16 compares prediction and ground truth.

For probability maps ``P`` and ground-truth maps ``G`` (one map per class or region), every map is
repeated to 3 channels, normalised with the ImageNet mean and std, resized to ``input_size``² and
passed through four frozen VGG-16 blocks ``φ_1 … φ_4`` (up to relu1_2, relu2_2, relu3_3, relu4_3)::

    L_LossNet(P, G) = Σ_{j=1..4} MSE(φ_j(P), φ_j(G))

(the mean squared error over all elements of block ``j``'s feature maps). 3D maps are cut into
slices along the first spatial axis; at most ``max_slices`` of them, drawn by a seeded generator,
are used per call. With ``max_classes``, at most that many of the ``K`` class maps, drawn by the same
generator, are compared per call (our extension: the reference is binary, and VGG-16 costs grow
linearly in ``K``): every map is equally likely to be drawn and all maps have the same size, so the
expected value of the term is the value over all ``K`` maps. Computed in float32 (autocast off).

Weights: the paper's LossNet is ImageNet VGG-16, i.e. torchvision's ``vgg16-397923af.pth``, read
from a local path given explicitly or by ``$NNUNET_SELFREG_VGG16_WEIGHTS`` (nothing is downloaded).
Without one, :class:`LossNet` refuses to start (:class:`MissingVGG16WeightsError`, saying what to do)
rather than silently comparing maps through a random network; a randomly initialised VGG-16 (fixed
seed) must be asked for with ``random_init=True``. The file's sha256 is computed and compared with
the ImageNet file's, so a run records exactly which weights it used.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nnunet_selfreg.epoch_stats import EpochStats

#: the name of the LossNet term in :attr:`SegLossWithLossNet.epoch_stats`
EPOCH_TERM = "lossnet"

ENV_VGG16_WEIGHTS = "NNUNET_SELFREG_VGG16_WEIGHTS"
#: ends (exclusive) of the four blocks in torchvision's ``vgg16().features``: relu1_2, relu2_2, relu3_3, relu4_3
VGG16_BLOCK_ENDS = (4, 9, 16, 23)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_RANDOM_SEED = 0
#: the trainers' ``lossnet_max_classes``: keeps a 20-class step within 2x of a 3-class one (docs/m2snet.md)
DEFAULT_MAX_CLASSES = 4
#: torchvision's ImageNet VGG-16 file (``VGG16_Weights.IMAGENET1K_V1``); its name holds the first 8 hex
#: digits of its sha256. The full digest and size are those pinned for this file by several public projects
#: that verify it after download (the size also matches torchvision's recorded ``_file_size`` of 527.796 MiB).
VGG16_IMAGENET_FILE = "vgg16-397923af.pth"
VGG16_IMAGENET_SHA256 = "397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0"
VGG16_IMAGENET_BYTES = 553_433_881
RANDOM_LOSSNET_TRAINERS = ("nnUNetTrainerM2SNet_RandomLossNet", "nnUNetTrainerMSNet_RandomLossNet")


class MissingVGG16WeightsError(RuntimeError):
    """LossNet was asked for without a VGG-16 weights file and without ``random_init=True``."""


def missing_weights_message() -> str:
    """The one-paragraph explanation raised when no VGG-16 weights file is given."""
    return (
        f"M2SNet's LossNet needs ImageNet VGG-16 weights and no weights file was given: set "
        f"{ENV_VGG16_WEIGHTS} to a local copy of torchvision's {VGG16_IMAGENET_FILE} (sha256 "
        f"{VGG16_IMAGENET_SHA256}, {VGG16_IMAGENET_BYTES:,} bytes; on a machine with internet access "
        f"torchvision.models.vgg16(weights='IMAGENET1K_V1') saves it under ~/.cache/torch/hub/checkpoints/), or set "
        f"the trainer attribute lossnet_vgg16_weights to its path. Nothing is downloaded. To train with a frozen, "
        f"randomly initialised (seeded) VGG-16 instead, which is not the paper's LossNet, use "
        f"{RANDOM_LOSSNET_TRAINERS[0]} or {RANDOM_LOSSNET_TRAINERS[1]}; nnUNetTrainerM2SNet_NoLossNet trains "
        f"without LossNet."
    )


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file (read in 8 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def vgg16_feature_layers() -> nn.Sequential:
    """torchvision's ``vgg16(weights=None).features`` up to relu4_3, uninitialised (built on 'meta')."""
    try:
        from torchvision.models import vgg16
    except ImportError as e:  # pragma: no cover - torchvision comes with nnU-Net's dependencies
        raise ImportError("LossNet needs torchvision (pip install torchvision)") from e
    with torch.device("meta"):  # no time spent initialising the 120M-parameter classifier
        layers = vgg16(weights=None).features[: VGG16_BLOCK_ENDS[-1]]
    return layers.to_empty(device="cpu")


def _random_init_(layers: nn.Sequential, seed: int) -> None:
    """torchvision's VGG initialisation (Kaiming normal, fan-out, zero bias) from a fixed seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in layers.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)


def load_vgg16_state_dict(layers: nn.Sequential, path: str | os.PathLike) -> None:
    """Load the ``features.*`` entries of a torchvision VGG-16 state dict file into ``layers``.

    Other entries (``classifier.*``, the layers after relu4_3) are ignored. Raises
    ``FileNotFoundError`` / ``ValueError`` naming the file when it is missing or not such a state dict.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"VGG-16 weights file not found: {path!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read VGG-16 weights from {path!r} ({type(e).__name__}: {e})") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path!r} does not hold a state dict (got {type(state).__name__})")
    wanted = layers.state_dict()
    picked: dict[str, Tensor] = {}
    problems: list[str] = []
    for key, ref in wanted.items():
        value = state.get(f"features.{key}")
        if not isinstance(value, Tensor):
            problems.append(f"missing features.{key}")
        elif value.shape != ref.shape:
            problems.append(f"features.{key} has shape {tuple(value.shape)}, expected {tuple(ref.shape)}")
        else:
            picked[key] = value
    if problems:
        raise ValueError(
            f"{path!r} is not a torchvision VGG-16 state dict (e.g. vgg16-397923af.pth): "
            + "; ".join(problems[:4])
            + (f"; ... ({len(problems)} problems)" if len(problems) > 4 else "")
        )
    layers.load_state_dict(picked, strict=True)


def resolve_vgg16_weights(path: str | os.PathLike | None) -> tuple[str | None, str]:
    """The weights file to use and where its name came from: ``path``, else the env variable, else none."""
    if path is not None and os.fspath(path) != "":
        return os.fspath(path), "given explicitly"
    env = os.environ.get(ENV_VGG16_WEIGHTS, "")
    if env:
        return env, f"${ENV_VGG16_WEIGHTS}"
    return None, "none given"


def draw_indices(n: int, at_most: int, generator: torch.Generator) -> Tensor:
    """All ``n`` indices if ``n <= at_most`` (the generator is not used), else ``at_most`` distinct ones, sorted."""
    if n <= at_most:
        return torch.arange(n)
    return torch.randperm(n, generator=generator)[:at_most].sort().values


class LossNet(nn.Module):
    """``Σ_j MSE(φ_j(P), φ_j(G))`` over four frozen VGG-16 blocks (see the module docstring).

    Args:
        weights: path of a torchvision VGG-16 state dict; ``None``: ``$NNUNET_SELFREG_VGG16_WEIGHTS``.
            Neither: :class:`MissingVGG16WeightsError`, unless ``random_init``.
        input_size: side of the square images fed to VGG-16 (224 as in the paper).
        max_slices: 3D only: slices along the first spatial axis used per call (at most).
        slice_seed: seed of the generator that draws the 3D slices and the classes (:meth:`reseed` resets it).
        max_classes: class (or region) maps compared per call (at most); ``None``: all of them.
        random_init: use a randomly initialised VGG-16 (torchvision's initialisation, seed
            ``random_seed``) and ignore any weights file: explicitly *not* the paper's LossNet.

    After construction: ``pretrained`` (a weights file was loaded), ``weights_path``, ``sha256`` (of
    that file), ``imagenet`` (its sha256 is torchvision's ImageNet file's), ``random_seed`` (random
    init only, else ``None``) and ``source``, a sentence for the training log.
    """

    def __init__(
        self,
        weights: str | os.PathLike | None = None,
        input_size: int = 224,
        max_slices: int = 8,
        slice_seed: int = 0,
        random_init: bool = False,
        random_seed: int = DEFAULT_RANDOM_SEED,
        max_classes: int | None = None,
    ) -> None:
        super().__init__()
        if int(input_size) < 16:
            raise ValueError(f"input_size must be >= 16 (VGG-16 pools 3 times before relu4_3), got {input_size}")
        if int(max_slices) < 1:
            raise ValueError(f"max_slices must be >= 1, got {max_slices}")
        if max_classes is not None and (isinstance(max_classes, bool) or int(max_classes) < 1):
            raise ValueError(f"max_classes must be >= 1 or None (all classes), got {max_classes!r}")
        self.input_size = int(input_size)
        self.max_slices = int(max_slices)
        self.max_classes = None if max_classes is None else int(max_classes)
        self.features = vgg16_feature_layers()
        self.weights_path: str | None = None
        self.sha256: str | None = None
        self.imagenet = False
        self.random_seed: int | None = None
        if random_init:
            _random_init_(self.features, int(random_seed))
            self.pretrained = False
            self.random_seed = int(random_seed)
            self.source = (
                f"randomly initialised VGG-16 (torchvision's initialisation, seed {self.random_seed}): "
                f"NOT the paper's ImageNet LossNet"
            )
        else:
            path, origin = resolve_vgg16_weights(weights)
            if path is None:
                raise MissingVGG16WeightsError(missing_weights_message())
            try:
                load_vgg16_state_dict(self.features, path)
            except (FileNotFoundError, ValueError) as e:
                raise type(e)(f"{e} [LossNet weights {origin}]") from e
            self.pretrained = True
            self.weights_path = path
            self.sha256 = file_sha256(path)
            self.imagenet = self.sha256 == VGG16_IMAGENET_SHA256
            kind = (
                f"torchvision's ImageNet {VGG16_IMAGENET_FILE}"
                if self.imagenet
                else f"NOT torchvision's ImageNet {VGG16_IMAGENET_FILE} (sha256 {VGG16_IMAGENET_SHA256})"
            )
            self.source = f"VGG-16 weights from {path} ({origin}), sha256 {self.sha256}: {kind}"
        self.features.requires_grad_(False)
        self.features.eval()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.generator = torch.Generator().manual_seed(int(slice_seed))

    def provenance(self) -> dict:
        """Which weights this LossNet uses, for checkpoints and reports."""
        return {
            "pretrained": self.pretrained,
            "random_init": self.random_seed is not None,
            "random_seed": self.random_seed,
            "weights_path": self.weights_path,
            "sha256": self.sha256,
            "imagenet": self.imagenet,
            "expected_sha256": VGG16_IMAGENET_SHA256,
            "source": self.source,
        }

    def train(self, mode: bool = True) -> LossNet:
        super().train(mode)
        self.features.eval()  # frozen: always in evaluation mode
        return self

    def reseed(self, seed: int) -> None:
        """Restart the draws of slices and classes from ``seed`` (the trainer does it every epoch)."""
        self.generator.manual_seed(int(seed))

    def select_slices(self, depth: int) -> Tensor:
        """Sorted indices of at most ``max_slices`` slices out of ``depth`` (next draw of the generator)."""
        return draw_indices(depth, self.max_slices, self.generator)

    def select_classes(self, k: int) -> Tensor:
        """Sorted indices of at most ``max_classes`` of ``k`` class maps (next draw of the generator)."""
        return draw_indices(k, k if self.max_classes is None else self.max_classes, self.generator)

    def to_images(self, maps: Tensor) -> Tensor:
        """(M, H, W) maps -> (M, 3, s, s) ImageNet-normalised images, ``s = input_size``."""
        x = F.interpolate(maps.unsqueeze(1), size=(self.input_size,) * 2, mode="bilinear", align_corners=False)
        return (x.expand(-1, 3, -1, -1) - self.mean) / self.std  # resizing and normalising commute

    def block_features(self, images: Tensor) -> list[Tensor]:
        """Outputs of the four VGG-16 blocks for (M, 3, s, s) images."""
        feats, start, x = [], 0, images
        for end in VGG16_BLOCK_ENDS:
            for i in range(start, end):
                x = self.features[i](x)
            feats.append(x)
            start = end
        return feats

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        """``pred``, ``target``: (B, K, *spatial) maps in [0, 1], 2D or 3D; returns a float32 scalar."""
        if pred.shape != target.shape or pred.ndim not in (4, 5):
            raise ValueError(
                f"LossNet expects prediction and target of equal shape (B, K, H, W) or (B, K, D, H, W), "
                f"got {tuple(pred.shape)} and {tuple(target.shape)}"
            )
        with torch.autocast(device_type=pred.device.type, enabled=False):
            pred, target = pred.float(), target.detach().float()
            if self.max_classes is not None and pred.shape[1] > self.max_classes:
                idx = self.select_classes(pred.shape[1]).to(pred.device)
                pred, target = pred.index_select(1, idx), target.index_select(1, idx)
            if pred.ndim == 5:
                idx = self.select_slices(pred.shape[2]).to(pred.device)
                pred, target = pred.index_select(2, idx), target.index_select(2, idx)
            pred = pred.reshape(-1, *pred.shape[-2:])
            target = target.reshape(-1, *target.shape[-2:])
            with torch.no_grad():
                target_feats = self.block_features(self.to_images(target))
            pred_feats = self.block_features(self.to_images(pred))
            return sum(F.mse_loss(p, t) for p, t in zip(pred_feats, target_feats, strict=True))


def probability_and_target_maps(
    logits: Tensor,
    target: Tensor,
    has_regions: bool,
    ignore_label: int | None = None,
    include_background: bool = False,
) -> tuple[Tensor, Tensor]:
    """nnU-Net's full-resolution output and target -> (probabilities, ground truth) maps for LossNet.

    Labels: softmax probabilities against the one-hot target (``target`` is (B, 1, ...) label
    indices), background channel 0 dropped unless ``include_background``. Regions: sigmoid against
    the region masks (``target`` is (B, R[+1], ...); with an ignore label its last channel marks the
    ignored voxels). Ignored voxels are zeroed in both maps. Float32.
    """
    logits = logits.float()
    k = logits.shape[1]
    if has_regions:
        gt = target[:, :k].float()
        valid = (1 - target[:, -1:].float()) if ignore_label is not None else None
        prob = torch.sigmoid(logits)
    else:
        if target.shape[1] != 1:
            raise ValueError(f"label target must have shape (B, 1, ...), got {tuple(target.shape)}")
        labels = target[:, 0].long()
        valid = None
        if ignore_label is not None:
            keep = labels != ignore_label
            valid = keep.unsqueeze(1).float()
            labels = torch.where(keep, labels, torch.zeros_like(labels))
        gt = F.one_hot(labels, k).movedim(-1, 1).float()
        prob = torch.softmax(logits, 1)
        if not include_background and k > 1:
            prob, gt = prob[:, 1:], gt[:, 1:]
    if valid is not None:
        prob, gt = prob * valid, gt * valid
    return prob, gt


class SegLossWithLossNet(nn.Module):
    """``L = L_seg(output, target) + w · LossNet(P, G)`` on the full-resolution output: nnU-Net's ``self.loss``.

    ``seg_loss`` is nnU-Net's own loss (Dice+CE with deep supervision), called unchanged. The LossNet
    term is added only in training mode with gradients enabled (the trainer puts this module in
    ``eval()`` for nnU-Net's validation steps, so validation losses stay comparable with the
    baseline). The unweighted term is summed on the device in :attr:`epoch_stats` (term ``"lossnet"``),
    read once per epoch (the trainer reduces it over DDP ranks).
    """

    def __init__(
        self,
        seg_loss: nn.Module | Callable[[object, object], Tensor],
        lossnet: LossNet,
        weight: float,
        has_regions: bool,
        ignore_label: int | None = None,
        include_background: bool = False,
    ) -> None:
        super().__init__()
        self.seg_loss = seg_loss
        self.lossnet = lossnet
        self.weight = float(weight)
        self.has_regions = bool(has_regions)
        self.ignore_label = ignore_label
        self.include_background = bool(include_background)
        self.epoch_stats = EpochStats((EPOCH_TERM,))

    def forward(self, output: Tensor | list[Tensor], target: Tensor | list[Tensor]) -> Tensor:
        seg = self.seg_loss(output, target)
        if not (self.training and torch.is_grad_enabled()) or self.weight == 0:
            return seg
        full_out = output[0] if isinstance(output, (list, tuple)) else output
        full_tgt = target[0] if isinstance(target, (list, tuple)) else target
        prob, gt = probability_and_target_maps(
            full_out, full_tgt, self.has_regions, self.ignore_label, self.include_background
        )
        term = self.lossnet(prob, gt)
        self.epoch_stats.add({EPOCH_TERM: term})
        return seg + self.weight * term

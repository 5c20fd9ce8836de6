"""Forward-hook feature taps on nnU-Net's U-Nets (dynamic-network-architectures).

The taps observe the outputs of every encoder stage (``encoder.stages[i]``: ``e_1 … e_S``, the last
one is the bottleneck; a ResEnc stem is not a stage) and every decoder stage
(``decoder.stages[j]``: ``d_1`` coarsest … ``d_{S-1}`` finest). They register forward hooks only, so
the network's modules, parameters, buffers, ``state_dict`` and outputs are exactly the stock ones;
checkpoints load into stock nnU-Net and inference builds a network without any hook.

A hook stores its output only while the stage is in training mode and the taps are attached; each
stage keeps at most its latest output (no growth if nobody consumes them), and :meth:`pop` hands
the maps over and forgets them, so nothing outlives the training step. Evaluation-mode forwards
(nnU-Net's validation and sliding-window prediction) store nothing, unless the taps are created with
``capture_eval=True`` (used by ``nnunet-selfreg analyze`` to look at a trained network in evaluation mode).

Attach before the first forward of a ``torch.compile``-d network: hooks registered after the first
compiled call are not traced into the graph.
"""

from __future__ import annotations

import weakref

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

SUPPORTED_ARCHITECTURES = (
    "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
)


class UnsupportedArchitectureError(TypeError):
    """The network is not one of the U-Nets whose stages we know how to tap."""


class IncompleteFeaturesError(RuntimeError):
    """A training-mode forward left some tapped stages without an output (the regulariser would be skipped)."""


def unwrap_network(network: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel / DataParallel and ``torch.compile`` wrappers."""
    while True:
        if isinstance(network, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            network = network.module
        elif hasattr(network, "_orig_mod") and isinstance(network._orig_mod, nn.Module):
            network = network._orig_mod
        else:
            return network


def _supported_classes() -> tuple[type, ...]:
    from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet

    return (PlainConvUNet, ResidualEncoderUNet)


def check_tappable(network: nn.Module, min_channels: int = 2) -> nn.Module:
    """Return the unwrapped network if its stages can be tapped, else raise a clear error."""
    net = unwrap_network(network)
    if not isinstance(net, _supported_classes()):
        cls = type(net)
        raise UnsupportedArchitectureError(
            f"nnunet_selfreg cannot tap {cls.__module__}.{cls.__qualname__}: its feature taps support "
            f"{' and '.join(SUPPORTED_ARCHITECTURES)} (nnU-Net's default plans and the ResEnc presets "
            "nnUNetResEncUNet{M,L,XL}Plans). Train this plans file with the stock nnUNetTrainer, or use "
            "a plans file whose 'network_arch_class_name' is one of the supported classes."
        )
    enc_ch = list(net.encoder.output_channels)
    dec_stages = list(net.decoder.stages)
    if len(net.encoder.stages) != len(enc_ch) or len(dec_stages) != len(enc_ch) - 1 or len(dec_stages) < 1:
        raise UnsupportedArchitectureError(
            f"unexpected U-Net layout: {len(net.encoder.stages)} encoder stages, {len(enc_ch)} output "
            f"channel entries, {len(dec_stages)} decoder stages (need S encoder and S-1 >= 1 decoder stages)"
        )
    for i, c in enumerate(enc_ch):
        if c < min_channels:
            raise ValueError(
                f"encoder stage {i} has {c} feature channel(s); SelfReg's internal feature distillation "
                f"needs at least {min_channels}. Raise 'features_per_stage' in the plans (every stage "
                "needs >= 2) or use nnUNetTrainerSelfReg_SCROnly."
            )
    return net


class UNetFeatureTaps:
    """Collects encoder and decoder stage outputs of a PlainConvUNet / ResidualEncoderUNet.

    ``capture_eval=True`` also stores outputs of evaluation-mode forwards (analysis of trained
    networks); the default stores training-mode outputs only.
    """

    def __init__(self, capture_eval: bool = False) -> None:
        self.capture_eval = capture_eval
        self._handles: list[RemovableHandle] = []
        self._encoder: dict[int, Tensor] = {}
        self._decoder: dict[int, Tensor] = {}
        self.num_encoder_stages = 0
        self.num_decoder_stages = 0
        self._network: weakref.ref[nn.Module] | None = None

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self, network: nn.Module, min_channels: int = 2) -> None:
        """Register one forward hook per encoder and decoder stage (idempotent)."""
        if self.attached:
            return
        net = check_tappable(network, min_channels=min_channels)
        self._network = weakref.ref(net)
        self.num_encoder_stages = len(net.encoder.stages)
        self.num_decoder_stages = len(net.decoder.stages)
        for i, stage in enumerate(net.encoder.stages):
            self._handles.append(stage.register_forward_hook(self._make_hook(self._encoder, i, self.capture_eval)))
        for j, stage in enumerate(net.decoder.stages):
            self._handles.append(stage.register_forward_hook(self._make_hook(self._decoder, j, self.capture_eval)))

    @staticmethod
    def _make_hook(store: dict[int, Tensor], index: int, capture_eval: bool = False):
        def hook(module: nn.Module, args, output: Tensor) -> None:
            if capture_eval or module.training:
                store[index] = output

        return hook

    def detach(self) -> None:
        """Remove every hook and forget any stored map."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._network = None
        self.clear()

    def clear(self) -> None:
        self._encoder.clear()
        self._decoder.clear()

    def pop(self, require: bool = False) -> tuple[list[Tensor], list[Tensor]] | None:
        """Hand over ``([e_1 … e_S], [d_1 … d_{S-1}])`` from the last captured forward and forget them.

        Returns None if no complete set was captured (no training-mode forward since the last pop, or
        no forward at all with ``capture_eval=True``). With ``require=True`` an incomplete set while
        the tapped network is in training mode raises :class:`IncompleteFeaturesError` instead: the
        caller is a training step whose regulariser must not be skipped silently (e.g. a subclass
        put one stage in evaluation mode, or a custom forward bypassed a stage).
        """
        enc, dec = self._encoder, self._decoder
        complete = len(enc) == self.num_encoder_stages and len(dec) == self.num_decoder_stages and enc
        result = ([enc[i] for i in sorted(enc)], [dec[j] for j in sorted(dec)]) if complete else None
        missing_enc = sorted(set(range(self.num_encoder_stages)) - set(enc))
        missing_dec = sorted(set(range(self.num_decoder_stages)) - set(dec))
        self.clear()
        if result is None and require and self.attached:
            net = self._network() if self._network is not None else None
            if net is not None and net.training:
                raise IncompleteFeaturesError(
                    "the network is in training mode but its forward left tapped stages without an output "
                    f"(missing encoder.stages {missing_enc}, decoder.stages {missing_dec}), so the feature "
                    "regulariser cannot be computed. A stage in evaluation mode stores nothing: do not call "
                    ".eval() on parts of the network during training (freeze parameters with "
                    "requires_grad_(False) instead), and do not bypass encoder/decoder stages in a custom "
                    "forward. If the loss was called twice for one forward, call the network again first."
                )
        return result

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.detach()
        except Exception:
            pass


class StageOutputTap:
    """Keeps the latest training-mode output of one module (e.g. the finest decoder stage).

    Like :class:`UNetFeatureTaps` it only registers a forward hook: the network is unchanged and
    evaluation-mode forwards store nothing. :meth:`pop` hands the output over and forgets it.
    """

    def __init__(self) -> None:
        self._handle: RemovableHandle | None = None
        self._value: Tensor | None = None

    @property
    def attached(self) -> bool:
        return self._handle is not None

    def attach(self, module: nn.Module) -> None:
        if self._handle is None:
            self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args, output: Tensor) -> None:
        if module.training:
            self._value = output

    def pop(self) -> Tensor | None:
        value, self._value = self._value, None
        return value

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._value = None


def finest_decoder_stage(network: nn.Module) -> tuple[nn.Module, int]:
    """The last (highest-resolution) decoder stage of a supported U-Net and its output channels."""
    net = check_tappable(network, min_channels=1)
    return net.decoder.stages[-1], int(net.encoder.output_channels[0])

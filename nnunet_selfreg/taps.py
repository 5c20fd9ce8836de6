"""Forward-hook feature taps, and the per-architecture declarations of where to tap.

**Declarations** (in the spirit of timm's ``feature_info``): a network class declares once which modules'
outputs are its encoder maps ``e_1 … e_S`` (shallow to deep), its decoder maps ``d_1 … d_{S-1}``
(coarse to fine; the last one, ``F_final``, is the teacher of SelfReg and the per-pixel embedding of
SS-Net), and how a module output becomes a ``(B, C, *spatial)`` map. Built in: dynamic-network-
architectures' ``PlainConvUNet``, ``ResidualEncoderUNet``, ``ResidualUNet`` and ``Primus``. A user's
own network declares itself in a few lines, either with a method on the class::

    class MyUNet(nn.Module):
        def feature_tap_points(self) -> TapPoints:
            return TapPoints(encoder=tuple(self.down_blocks), decoder=tuple(self.up_blocks))

or, for a class one cannot edit, with :func:`declare_taps`::

    declare_taps(TheirUNet)(lambda net: TapPoints(encoder=tuple(net.enc), decoder=tuple(net.dec)))

**Taps**: :class:`FeatureTaps` registers forward hooks only, so the network's modules, parameters,
buffers, ``state_dict`` and outputs are exactly the stock ones; checkpoints load into stock nnU-Net and
inference builds a network without any hook. A hook stores its output only while the module is in
training mode and the taps are attached; each module keeps at most its latest output, and
:meth:`FeatureTaps.pop` hands the maps over and forgets them, so nothing outlives the training step.
Evaluation-mode forwards (nnU-Net's validation and sliding-window prediction) store nothing, unless
the taps are created with ``capture_eval=True`` (used by ``nnunet-selfreg analyze``).

Attach before the first forward of a ``torch.compile``-d network: hooks registered after the first
compiled call are not traced into the graph.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

SUPPORTED_ARCHITECTURES = (
    "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
    "dynamic_network_architectures.architectures.unet.ResidualUNet",
    "dynamic_network_architectures.architectures.primus.Primus",
)

DECLARATION_RECIPE = """Declare where its features are, in a few lines (see docs/method.md, "Your own network"):

    from nnunet_selfreg.taps import TapPoints, declare_taps

    @declare_taps(MyNetwork)
    def _my_taps(net):
        return TapPoints(
            encoder=tuple(net.encoder_blocks),   # e_1 ... e_S, shallow to deep
            decoder=tuple(net.decoder_blocks),   # d_1 ... d_{S-1}, coarse to fine; the last = teacher F_final
        )

(or give MyNetwork a method feature_tap_points(self) returning the same TapPoints)."""

#: the method a network class may define to declare its tap points (read by SelfReg, SS-Net and analyze)
DECLARATION_METHOD = "feature_tap_points"
#: its former name, still honoured with a DeprecationWarning so that a user's declaration keeps working
DEPRECATED_DECLARATION_METHOD = "selfreg_tap_points"


class UnsupportedArchitectureError(TypeError):
    """The network declares no tap points (and is not a built-in architecture)."""


class IncompleteFeaturesError(RuntimeError):
    """A training-mode forward left some tapped modules without an output (the regulariser would be skipped)."""


@dataclass(frozen=True)
class TapPoints:
    """Where a network's features are read.

    ``encoder``: modules whose outputs are ``e_1 … e_S`` (shallow to deep). ``decoder``: modules whose
    outputs are ``d_1 … d_{S-1}`` (coarse to fine); ``decoder[-1]`` is ``F_final``, the teacher.
    ``encoder_channels`` / ``decoder_channels``: their widths when known before a forward (for early
    checks). ``to_map(module, output)`` turns an output into a ``(B, C, *spatial)`` map (default: the
    output itself). ``first_student``: the first encoder map SelfReg regularises by default (1 for U-Nets,
    whose full-resolution first stage the authors' code leaves out; 0 where every declared map counts).
    """

    encoder: tuple[nn.Module, ...]
    decoder: tuple[nn.Module, ...]
    encoder_channels: tuple[int, ...] | None = None
    decoder_channels: tuple[int, ...] | None = None
    to_map: Callable[[nn.Module, Tensor], Tensor] | None = None
    first_student: int = 1
    description: str = ""

    def __post_init__(self) -> None:
        if len(self.decoder) < 1 or len(self.encoder) < 1:
            raise UnsupportedArchitectureError(
                f"tap points need at least one encoder and one decoder module (the last decoder module is the "
                f"teacher), got {len(self.encoder)} and {len(self.decoder)}"
            )
        if not 0 <= self.first_student <= len(self.encoder):
            raise ValueError(f"first_student={self.first_student} is outside 0..{len(self.encoder)}")


_DECLARATIONS: dict[type, Callable[[nn.Module], TapPoints]] = {}


def declare_taps(network_class: type) -> Callable[[Callable[[nn.Module], TapPoints]], Callable[[nn.Module], TapPoints]]:
    """Register ``fn(network) -> TapPoints`` for ``network_class`` and its subclasses (a decorator)."""

    def register(fn: Callable[[nn.Module], TapPoints]) -> Callable[[nn.Module], TapPoints]:
        _DECLARATIONS[network_class] = fn
        return fn

    return register


def unwrap_network(network: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel / DataParallel and ``torch.compile`` wrappers."""
    while True:
        if isinstance(network, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            network = network.module
        elif hasattr(network, "_orig_mod") and isinstance(network._orig_mod, nn.Module):
            network = network._orig_mod
        else:
            return network


def _unet_points(net: nn.Module) -> TapPoints:
    enc_ch = tuple(int(c) for c in net.encoder.output_channels)
    stages, dec = tuple(net.encoder.stages), tuple(net.decoder.stages)
    if len(stages) != len(enc_ch) or len(dec) != len(enc_ch) - 1 or len(dec) < 1:
        raise UnsupportedArchitectureError(
            f"unexpected U-Net layout: {len(stages)} encoder stages, {len(enc_ch)} output channel entries, "
            f"{len(dec)} decoder stages (need S encoder and S-1 >= 1 decoder stages)"
        )
    return TapPoints(
        encoder=stages,
        decoder=dec,
        encoder_channels=enc_ch,
        decoder_channels=tuple(reversed(enc_ch[:-1])),
        first_student=1,
        description="encoder.stages[i] -> e_(i+1), decoder.stages[j] -> d_(j+1); teacher decoder.stages[-1]",
    )


def _primus_points(net: nn.Module) -> TapPoints:
    """Primus (EVA ViT on 3D patch tokens): every quarter of the blocks is a student, the last block the teacher.

    Block outputs are tokens ``(B, R + N, C)`` (``R`` register tokens first); they are reshaped to the
    ``(B, C, W, H, D)`` token grid, exactly as Primus reshapes the encoder output before its decoder.
    """
    blocks = tuple(net.eva.blocks)
    depth = len(blocks)
    picks = sorted({max(round(depth * k / 4) - 1, 0) for k in (1, 2, 3)} - {depth - 1})
    rope = getattr(net.eva, "rope", None)  # its feat_shape is the token grid the network was built for
    grid = tuple(int(g) for g in rope.feat_shape) if getattr(rope, "feat_shape", None) is not None else None
    registers = net.register_tokens.shape[1] if getattr(net, "register_tokens", None) is not None else 0
    embed = int(net.embed_dim)

    def to_map(module: nn.Module, tokens: Tensor) -> Tensor:
        tokens = tokens[:, registers:]
        b, n, c = tokens.shape
        shape = grid if grid is not None and int(_prod(grid)) == n else None
        if shape is None:
            raise IncompleteFeaturesError(
                f"Primus produced {n} tokens, which do not match its token grid {grid}: SelfReg needs the training "
                "patch size the network was built for (and no patch dropping)"
            )
        return tokens.transpose(1, 2).reshape(b, c, *shape)

    return TapPoints(
        encoder=tuple(blocks[i] for i in picks),
        decoder=(blocks[-1],),
        encoder_channels=(embed,) * len(picks),
        decoder_channels=(embed,),
        to_map=to_map,
        first_student=0,
        description=f"eva.blocks{picks} -> students, eva.blocks[{depth - 1}] (last block) -> teacher, tokens as maps",
    )


def _prod(values: Sequence[int]) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


def _builtin_declarations() -> None:
    from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet, ResidualUNet

    for cls in (PlainConvUNet, ResidualEncoderUNet, ResidualUNet):
        _DECLARATIONS.setdefault(cls, _unet_points)
    try:
        from dynamic_network_architectures.architectures.primus import Primus
    except ImportError:  # pragma: no cover - older dynamic-network-architectures
        return
    _DECLARATIONS.setdefault(Primus, _primus_points)


def _declaration_method(net: nn.Module) -> Callable[[], TapPoints] | None:
    """The network's own declaration method, if it has one (the deprecated name with a warning)."""
    method = getattr(net, DECLARATION_METHOD, None)
    if callable(method):
        return method
    method = getattr(net, DEPRECATED_DECLARATION_METHOD, None)
    if not callable(method):
        return None
    warnings.warn(
        f"{type(net).__qualname__}.{DEPRECATED_DECLARATION_METHOD}() is deprecated: rename it "
        f"{DECLARATION_METHOD}() (SelfReg, SS-Net and analyze all read it)",
        DeprecationWarning,
        stacklevel=3,
    )
    return method


def tap_points(network: nn.Module) -> TapPoints:
    """The tap points of ``network`` (wrappers stripped), or an error that shows how to declare them."""
    net = unwrap_network(network)
    method = _declaration_method(net)
    if method is not None:
        return method()
    _builtin_declarations()
    for cls in type(net).__mro__:
        if cls in _DECLARATIONS:
            return _DECLARATIONS[cls](net)
    cls = type(net)
    raise UnsupportedArchitectureError(
        f"nnunet_selfreg does not know where to tap {cls.__module__}.{cls.__qualname__}: built in are "
        f"{', '.join(a.rsplit('.', 1)[1] for a in SUPPORTED_ARCHITECTURES)} (PlainConvUNet: nnU-Net's default "
        "plans; ResidualEncoderUNet: the nnUNetResEncUNet{M,L,XL}Plans presets; Primus: nnU-Net's Primus "
        f"trainers). {DECLARATION_RECIPE}"
    )


def check_tappable(network: nn.Module, min_channels: int = 2) -> nn.Module:
    """Return the unwrapped network if its tap points are declared (and wide enough), else a clear error."""
    net = unwrap_network(network)
    points = tap_points(net)
    for i, c in enumerate(points.encoder_channels or ()):
        if i >= points.first_student and c < min_channels:
            raise ValueError(
                f"encoder stage {i} has {c} feature channel(s); SelfReg's internal feature distillation "
                f"needs at least {min_channels}. Raise 'features_per_stage' in the plans (every stage "
                "needs >= 2) or use nnUNetTrainerSelfReg_SCROnly."
            )
    return net


class FeatureTaps:
    """Collects the declared encoder and decoder maps of a network (:func:`tap_points`).

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
        self.points: TapPoints | None = None

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self, network: nn.Module, min_channels: int = 2) -> None:
        """Register one forward hook per declared encoder and decoder module (idempotent)."""
        if self.attached:
            return
        net = check_tappable(network, min_channels=min_channels)
        points = tap_points(net)
        self._network = weakref.ref(net)
        self.points = points
        self.num_encoder_stages = len(points.encoder)
        self.num_decoder_stages = len(points.decoder)
        for i, module in enumerate(points.encoder):
            self._handles.append(module.register_forward_hook(self._make_hook(self._encoder, i, points.to_map)))
        for j, module in enumerate(points.decoder):
            self._handles.append(module.register_forward_hook(self._make_hook(self._decoder, j, points.to_map)))

    def _make_hook(self, store: dict[int, Tensor], index: int, to_map: Callable[[nn.Module, Tensor], Tensor] | None):
        capture_eval = self.capture_eval

        def hook(module: nn.Module, args, output: Tensor) -> None:
            if capture_eval or module.training:
                store[index] = output if to_map is None else to_map(module, output)

        return hook

    def detach(self) -> None:
        """Remove every hook and forget any stored map."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._network = None
        self.points = None
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


#: the name this class had when it tapped U-Nets only
UNetFeatureTaps = FeatureTaps


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
    """The declared teacher module (``F_final``: a U-Net's last decoder stage) and its output channels."""
    points = tap_points(network)
    if points.decoder_channels is None:
        raise UnsupportedArchitectureError(
            f"{type(unwrap_network(network)).__name__}'s tap points do not give decoder_channels: declare them"
        )
    return points.decoder[-1], int(points.decoder_channels[-1])

"""Starting weights. VGG: torchvision's (torch hub cache, else downloaded), or a checkpoint or state dict.
The small CNNs: `builtin` (the digit model shipped in the package), or a checkpoint, an exported
state dict or a plain state dict.

Offline, a missing file is one error that names the file and the folder to put it in;
nothing is downloaded unless the machine can reach the host.
"""

from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import urlparse

import torch

from hwr_dist.errors import HwrError
from hwr_dist.models.cnn import FineTuneCNN
from hwr_dist.models.state import mismatch
from hwr_dist.models.vgg import BLOCKS, HEADS, IMAGENET_MEAN, IMAGENET_STD, MIN_INPUT, VARIANTS, VGG, GrayConv


BUILTIN_NAME = "builtin"
BUILTIN = Path(__file__).parent / "builtin" / "digits.pt"
BUILTIN_RECIPE = "configs/builtin_digits.yaml"
# torchvision weight names per variant (checked again against torchvision when loading)
TORCHVISION_WEIGHTS = {v: {"IMAGENET1K_V1", "DEFAULT"} | ({"IMAGENET1K_FEATURES"} if v == "vgg16" else set())
                       for v in VARIANTS}


def looks_like_path(weights: str) -> bool:
    return "/" in weights or "\\" in weights or weights.endswith((".pt", ".pth", ".bin")) or Path(weights).exists()


def _torchvision_weights(variant: str, name: str):
    import torchvision.models as tvm

    enum = tvm.get_model_weights(variant)
    try:
        return enum[name]
    except KeyError:
        names = ", ".join(w.name for w in enum)
        raise HwrError(f"model.weights: {variant} has no torchvision weights '{name}'; "
                       f"use none, one of {names}, or a checkpoint path") from None


def _hub_file(variant: str, name: str):
    """(weights enum entry, where torch hub keeps its file, the one-line 'put it there' advice)."""
    w = _torchvision_weights(variant, name)
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    filename = Path(urlparse(w.url).path).name
    advice = f"{variant} weights {name} are not in the torch hub cache; put {filename} (from {w.url}) in {folder}"
    return w, folder / filename, advice


def _require_connection(url: str, advice: str) -> None:
    host = urlparse(url).hostname
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError:
        raise HwrError(f"{advice} (offline: no connection to {host})") from None


def check_weights(cfg) -> None:
    """Fail fast, before data loading, when model.weights cannot be had."""
    if cfg.weights in ("none", BUILTIN_NAME):
        return
    if looks_like_path(cfg.weights):
        if not Path(cfg.weights).is_file():
            load_weight_file(Path(cfg.weights))  # raises the not-found error
        return
    w, path, advice = _hub_file(cfg.variant, cfg.weights)
    if not path.is_file():
        _require_connection(w.url, advice)


def load_torchvision_state(variant: str, name: str) -> tuple[dict[str, torch.Tensor], tuple, tuple]:
    """(state dict, RGB mean, RGB std): from the torch hub cache, else downloaded."""
    w, path, advice = _hub_file(variant, name)
    preset = w.transforms()
    mean, std = tuple(preset.mean), tuple(preset.std)
    if path.is_file():
        try:
            return torch.load(path, map_location="cpu", weights_only=True), mean, std
        except Exception as e:
            raise HwrError(f"{path} is not a readable torchvision checkpoint ({type(e).__name__}); "
                           f"delete it and put a fresh copy of {w.url} there") from None
    _require_connection(w.url, advice)
    try:
        state = torch.hub.load_state_dict_from_url(w.url, model_dir=str(path.parent), map_location="cpu",
                                                   check_hash=True, weights_only=True)
    except Exception as e:
        raise HwrError(f"{advice} (download failed: {type(e).__name__}: {str(e)[:120]})") from None
    return state, mean, std


def load_weight_file(path: Path) -> tuple[dict[str, torch.Tensor], str, tuple[float, float] | None]:
    """(state dict, kind, the (mean, std) its inputs were normalised with if the file says) from a
    checkpoint of this tool (its EMA weights if kept, else 'model'), an `hwr export --format
    state-dict` file, or a plain state dict."""
    if not path.is_file():
        raise HwrError(f"model.weights: {path} not found; use none, builtin (small CNNs), a torchvision "
                       "weights name such as IMAGENET1K_V1 (VGG), or the path of a checkpoint / state dict")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise HwrError(f"model.weights: {path} cannot be read as a state dict ({first[:120]})") from None
    if isinstance(obj, dict) and "model" in obj and "config" in obj:
        return obj.get("ema") or obj["model"], "checkpoint", tuple(obj["norm"]) if obj.get("norm") else None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj.get("meta"), dict):
        return obj["state_dict"], "exported state dict", (obj["meta"]["mean"], obj["meta"]["std"])
    tensors = isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values())
    if tensors and all(isinstance(k, str) for k in obj):
        return obj, "state dict", None
    raise HwrError(f"model.weights: {path} is neither an hwr-dist checkpoint nor a state dict of tensors")


def load_into(model: VGG, state: dict[str, torch.Tensor], where: str, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> str:
    """Backbone must fit exactly (RGB first convs are folded); the head loads if it fits, else
    stays new. Returns a one-line note of what happened."""
    state = dict(state)
    w0 = state.get("features.0.weight")
    if w0 is not None and w0.ndim == 4 and w0.shape[1] == 3 and "features.0.bias" in state:
        gray = GrayConv.fold(w0.float(), state["features.0.bias"].float(), mean, std)
        state["features.0.weight"], state["features.0.offset"] = gray.weight.data, gray.offset.data
    for k in [k for k in state if k.startswith("classifier.")]:  # torchvision layout
        state["head." + k] = state.pop(k)
    own = model.state_dict()
    keep = {"features.0.data_mean", "features.0.data_std"}  # set from the current data, not the source
    backbone = [k for k in own if not k.startswith("head.") and k not in keep]
    extra = [k for k in state if not k.startswith("head.") and k not in own and k not in keep
             and not k.startswith(("avgpool.",))]
    problem = mismatch(own, state, backbone, extra)
    if problem:
        raise HwrError(f"model.weights: {where} does not fit {model.variant} ({problem}); "
                       "pick the variant it was saved from")
    new = {k: state[k] for k in backbone}
    head_keys = [k for k in own if k.startswith("head.")]
    head_fits = all(k in state and state[k].shape == own[k].shape and torch.isfinite(state[k]).all()
                    for k in head_keys)
    if head_fits:
        new.update({k: state[k] for k in head_keys})
    elif model.head.kind == "vgg":  # torchvision classifier: keep all but the last layer
        last = max(int(k.split(".")[2]) for k in head_keys)
        new.update({k: state[k] for k in head_keys if int(k.split(".")[2]) != last and k in state
                    and state[k].shape == own[k].shape and torch.isfinite(state[k]).all()})
    missing_now = model.load_state_dict(new, strict=False).missing_keys
    replaced = [k for k in missing_now if k.startswith("head.")]
    head = f"new head ({len(replaced)} tensors initialised)" if replaced else "head loaded"
    return f"weights from {where}; {head}"


def build_vgg(cfg, num_classes: int, pretrained: bool = True) -> VGG:
    """pretrained=False: random weights whatever model.weights says (a checkpoint is loaded over them)."""
    frozen = BLOCKS - cfg.trainable_blocks if cfg.freeze == "features" else 0
    model = VGG(cfg.variant, num_classes, cfg.input_size, cfg.head, cfg.dropout, 0,
                cfg.unfreeze_after_epochs, cfg.backbone_lr_scale)
    weights = cfg.weights if pretrained else "none"
    if weights != "none" and looks_like_path(weights):
        state, kind, _ = load_weight_file(Path(weights))  # GrayConv keeps pixel units: no normalisation to carry
        model.weights_note = load_into(model, state, f"{kind} {weights}")
    elif weights != "none":
        state, mean, std = load_torchvision_state(cfg.variant, weights)
        model.weights_note = load_into(model, state, f"torchvision {cfg.variant} {weights}", mean, std)
    model.set_frozen(frozen)
    return model


def check_vgg_config(cfg) -> None:
    """model.* for vgg, and what caching the features needs of the data section."""
    from hwr_dist.config import check, one_of

    m = cfg.model
    one_of("model.variant", m.variant, VARIANTS)
    if m.weights != "none" and not looks_like_path(m.weights):
        one_of("model.weights", m.weights, {"none", *TORCHVISION_WEIGHTS[m.variant], "a checkpoint path"})
    check(m.input_size >= MIN_INPUT, "model.input_size", f"an integer >= {MIN_INPUT} (VGG halves the image five times)",
          m.input_size)
    one_of("model.head", m.head, HEADS)
    check(0 <= m.trainable_blocks < BLOCKS, "model.trainable_blocks", f"an integer in 0..{BLOCKS - 1}", m.trainable_blocks)
    one_of("model.cache_features", m.cache_features, {"auto", "on", "off"})
    if m.freeze == "none" and (m.trainable_blocks or m.unfreeze_after_epochs):
        raise HwrError("model.trainable_blocks and model.unfreeze_after_epochs need model.freeze=features")
    if m.cache_features == "on" and (m.freeze != "features" or m.trainable_blocks or cfg.data.augment.enabled):
        raise HwrError("model.cache_features=on needs a frozen backbone and fixed inputs: set model.freeze=features, "
                       "model.trainable_blocks=0 and data.augment.enabled=false (or use cache_features=auto)")


# --- the small CNNs ------------------------------------------------------------------------


def builtin_model_config() -> dict:
    """The model section the shipped digit model was trained with (an `hwr export --format state-dict` file)."""
    return torch.load(BUILTIN, map_location="cpu", weights_only=True)["config"]["model"]


def check_cnn_weights(m) -> None:
    """model.weights for the small CNNs: none, builtin (same network as the shipped one) or a path."""
    if m.weights == "none" or looks_like_path(m.weights):
        return
    if m.weights != BUILTIN_NAME:
        raise HwrError(f"model.weights: expected none, builtin or the path of a checkpoint / state dict for "
                       f"model.name={m.name}, got {m.weights!r}")
    b = builtin_model_config()
    shipped = {"name": b["name"], "width": b["width"], "stem": b.get("stem", "pool"),
               "pool_first": b.get("pool_first", False)}
    if {k: getattr(m, k) for k in shipped} != shipped:
        settings = " ".join(f"model.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in shipped.items())
        raise HwrError(f"model.weights=builtin is the shipped {b['name']} ({BUILTIN_RECIPE}); set {settings}, "
                       "or start from configs/adapt_own.yaml")


def _layer(key: str) -> int:
    head = key.split(".")[0]
    return int(head) if head.isdigit() else -1  # another network's key: counted with the backbone


def load_cnn_weights(model: FineTuneCNN, weights: str) -> None:
    """The backbone must fit exactly; head tensors load where they fit (a new last layer when the
    class count differs). The normalisation the weights expect is folded in by `set_input_norm`."""
    path = BUILTIN if weights == BUILTIN_NAME else Path(weights)
    state, kind, norm = load_weight_file(path)
    where = "the shipped digit model (builtin)" if weights == BUILTIN_NAME else f"{kind} {weights}"
    own = model.state_dict()
    backbone = [k for k in own if _layer(k) < model.backbone_len]
    extra = [k for k in state if k not in own and _layer(k) < model.backbone_len]
    problem = mismatch(own, state, backbone, extra)
    if problem:
        raise HwrError(f"model.weights: {where} does not fit this network ({problem}); "
                       "use the model.name and model.width it was trained with")
    head = [k for k in own if k not in backbone and k in state and state[k].shape == own[k].shape]
    model.load_state_dict({k: state[k] for k in backbone + head}, strict=False)
    new = len(own) - len(backbone) - len(head)
    model.source_norm = norm
    model.weights_note = (f"weights from {where}; " + (f"new head layers ({new} tensors initialised)" if new
                                                        else "head loaded"))
